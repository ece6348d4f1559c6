"""Data: readers for LSD, RAF-AU, OpenFace pseudo-labels and generic label CSVs, and the built-in faces.

Every dataset item is a tuple `(image, expression, aus)`: the image tensor, the expression index in
`aucvt_zoo.labels.EXPRESSIONS` (-1 where the sample has no expression label), and a float tensor of AU targets
in the label set's order (NaN where an AU is not labelled, so the loss masks it).

Command-line modules (imported on use, so `python -m` runs them cleanly): OpenFace pseudo-labels,
`python -m aucvt_zoo.data.openface` (`openface_to_labels`); exporting built-in faces in the real formats,
`python -m aucvt_zoo.data.faces_export` (`export_split`).
"""
from .faces import FacsFaces
from .readers import (
    ImageReadError, LabelCsv, LabelFileError, LsdFolder, LsdTestList, RafAu, read_predictions, write_predictions,
)

__all__ = [
    'FacsFaces', 'ImageReadError', 'LabelCsv', 'LabelFileError', 'LsdFolder', 'LsdTestList', 'RafAu',
    'read_predictions', 'write_predictions',
]
