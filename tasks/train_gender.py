"""Model 1: a CNN that classifies gender (sigmoid output = probability of female).

    python tasks/train_gender.py --recipe recipes/gender.toml     # the shipped model's run
    python tasks/train_gender.py --epochs 12 --gender-label-smoothing 0.1
    python tasks/train_gender.py --params results/tuning/gender.json       # what tune found

The model (agegender.models.cnn.build_cnn), its defaults and its score live in the family registry
(agegender.models.registry); the command line is the one every CNN trainer shares (agegender.training.cnn_command).
"""

from agegender.training.cnn_command import cnn_trainer

app = cnn_trainer("gender")

if __name__ == "__main__":
    app()
