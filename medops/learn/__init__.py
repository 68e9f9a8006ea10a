"""What training and its neighbours share, owned by no stage: the input pipeline, distribution
over devices and workers, the augmentation preview."""
