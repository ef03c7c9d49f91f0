"""Network families used by two or more model folders (a folder's own network lives in that folder).

Importing this package registers the ISIC family (`U_Net`, `R2U_Net`, `AttU_Net`, `R2AttU_Net`) in
`common.registry`, used by AttU_Net/ and R2U_Net/.
"""

from __future__ import annotations

from common.networks.attention_r2unet import AttU_Net, R2AttU_Net, R2U_Net, U_Net
from common.networks.input_checks import check_divisible_input

__all__ = ["U_Net", "R2U_Net", "AttU_Net", "R2AttU_Net", "check_divisible_input"]
