"""Configuration of the ISBI 2012 U-Net, with the keys and defaults of MindSpore's `src/config.py`.

Every key is also a command-line flag of train.py / eval.py (`--lr=2e-4`, `--cross_valid_ind=all`, ...);
the flag wins over this file. Keys of the original (mindspore model_zoo official/cv/unet, `cfg_unet`):

    name                  'Unet'
    lr                    1e-4     Adam learning rate (constant; the original has no schedule)
    epochs                400      passes over the 24 training pages of one fold, 1 device
    distribute_epochs     1600     the same when run distributed (--run_distribute)
    batchsize             16       images per device and step (MindSpore batches per device)
    cross_valid_ind       1        fold of the 5-fold split used for validation (0..4; 'all' here)
    num_classes           2        output channels; class 0 = membrane, class 1 = cell interior
    num_channels          1        grey-scale input
    keep_checkpoint_max   10       ckpt_unet_medical_adam-<epoch>_<step>.pth files kept
    weight_decay          5e-4     L2 weight decay of Adam (MindSpore adds it to the gradient)
    loss_scale            1024     static loss scale given to MindSpore's Adam ...
    FixedLossScaleManager 1024     ... and to its FixedLossScaleManager; here --loss_scale under --amp
    resume                False    continue from resume_ckpt
    resume_ckpt           './'     checkpoint to continue from

Keys added by this port (the original hard-codes these values or lacks the feature):

    repeat                None     passes per checkpoint epoch; None = all `epochs` passes in one epoch
                                   (the original: one epoch, one checkpoint at the end). The total
                                   number of steps does not depend on it.
    image_size            572      network input side (output = image_size - 184); 188, 204, ... work
    pad_mode              'constant'  'constant' = the original's zero padding, 'reflect' = the paper's
                                   mirroring of the image border
    train_augment         True     flips, random crop box, brightness shift (the original's augmentation)
    run_eval              False    validate every eval_interval epochs (the last epoch always is)
    eval_interval         1
"""

from __future__ import annotations

cfg_unet: dict = {
    "name": "Unet",
    "lr": 0.0001,
    "epochs": 400,
    "distribute_epochs": 1600,
    "batchsize": 16,
    "cross_valid_ind": 1,
    "num_classes": 2,
    "num_channels": 1,
    "keep_checkpoint_max": 10,
    "weight_decay": 0.0005,
    "loss_scale": 1024.0,
    "FixedLossScaleManager": 1024.0,
    "resume": False,
    "resume_ckpt": "./",
    # Added by this port.
    "repeat": None,
    "image_size": 572,
    "pad_mode": "constant",
    "train_augment": True,
    "run_eval": False,
    "eval_interval": 1,
}

# The network's output side for the default input (572 - 184); the original calls it `crop`.
CROP_SIZE = 388
FOLDS = 5
