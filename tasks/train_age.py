"""Model 2: a CNN that regresses age (normalised by 120), or reads it from a DEX softmax over ages.

    python tasks/train_age.py --recipe recipes/age.toml          # the shipped model's run
    python tasks/train_age.py --age-head dex --out results/models/age-dex

The model (agegender.models.cnn.build_cnn), its defaults and its score live in the family registry
(agegender.models.registry); the command line is the one every CNN trainer shares (agegender.training.cnn_command).
"""

from agegender.training.cnn_command import cnn_trainer

app = cnn_trainer("age")

if __name__ == "__main__":
    app()
