"""ISIC 2018 Task 1 training shared by AttU_Net/ and R2U_Net/ (the LeeJunHyun/Image_Segmentation family).

Both folders train the same four networks on the same data with the same flags, so the program lives
here once and each folder's `main.py`, `dataset.py`, `predict.py` and `pthtar2onnx.py` (alias `pthtar2onx.py`) only set its defaults:

- `prepare`   the official folders or zips -> `train/ valid/ test/` + `_GT` with a seeded split list
- `dataset`   decoded-once cache, the reference's paired augmentation, the `Dataset`
- `solver`    the train / test program (flags, log lines, model selection, summary)
- `losscurve` the loss-curve CSV a run writes and `run_scripts/loss.py` compares
- `predict`, `export`  masks for a folder of images; ONNX export with onnxruntime parity

Data: Codella et al., "Skin Lesion Analysis Toward Melanoma Detection 2018", arXiv:1902.03368.
"""
