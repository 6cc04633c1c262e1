"""The inference layer: face detectors, the TFLite runtime, the Predictor (the one inference path), age intervals,
Grad-CAM, photos in and rows out, drawing, webcam tracking and models from the Hub. It never imports training."""
