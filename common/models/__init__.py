"""The models layer: the family registry, the model builders (our CNN, the transfer models and their backbones,
the Cydral networks), the custom Keras layers and model folders on disk. It imports only the data layer."""
