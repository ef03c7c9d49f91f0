"""UNet_mindspore: the MindSpore unet_medical model (ISBI 2012) ported to PyTorch."""
