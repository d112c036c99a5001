"""Input pipelines: TFDS sources decoded once into memory, augmentation as pure jittable functions."""
