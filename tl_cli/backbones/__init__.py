"""Backbones: the factory (`factory`: ``timm:``/``torchvision:``/``tl:`` networks, their
preprocessing and stages) and their weights (`weights`)."""
