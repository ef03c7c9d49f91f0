"""Shared runtime of the medical-segmentation model zoo.

Each model folder (AttU_Net, R2U_Net, UNet_nested, UNet_mindspore, VNet) imports from here what two or
more folders need: device selection, mixed precision, distributed setup, metrics, losses, logging and
the ModelZoo summary, checkpoints, data helpers, demo-data writers, plots and export.
`common` never imports a model folder.
"""
