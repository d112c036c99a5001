"""Input pipelines: CIFAR-10 from TFDS decoded once into memory (augmented inside the jitted step), and
ImageNet host preprocessing (JPEG decode, augmentation, per-process sharding, a grain loader)."""
