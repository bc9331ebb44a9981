"""Training with torch (the export/training extra): the contrastive trainer behind `xmodal models train --pairs`
and xmodal-mini's recipe, in ``models.training.trainer``. Importing this package loads nothing; importing the
trainer loads torch."""
