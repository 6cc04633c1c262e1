"""The data layer, below every other: paths, UTKFace's labels, the labelled datasets, the manifest and its
decoded-image cache, image reading and alignment, and the tf.data pipeline. It imports no other layer."""
