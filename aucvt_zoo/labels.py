"""Labels as data: the expressions, the AU label sets, FACS names, and the AU region tables of AU-CVT.

Every model, reader and renderer of the zoo takes its label facts from here, so an AU list is typed once.
Sources: the paper (arXiv:2207.09777, sections 3.3 and 4), DESIGN.md sections 2-3, Ekman & Friesen's FACS
manual for the AU names.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

__all__ = [
    'EXPRESSIONS', 'EXPRESSION_ALIASES', 'AU_SETS', 'FACS_NAMES', 'AU_AREAS', 'GRID', 'Region', 'REGION_LAYOUTS',
    'resolve_aus', 'au_name', 'expression_index', 'regions_for',
]

# The 6 expressions in LSD order (the dataset's folders, sorted). Index i is logit i of every zoo model.
EXPRESSIONS: Tuple[str, ...] = ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise')

# Folder names seen in the wild, matched case-insensitively. 'angrer' is the LSD release's own spelling.
EXPRESSION_ALIASES: Dict[str, str] = {
    'anger': 'anger', 'angry': 'anger', 'angrer': 'anger',
    'disgust': 'disgust', 'disgusted': 'disgust',
    'fear': 'fear', 'fearful': 'fear', 'afraid': 'fear',
    'happiness': 'happiness', 'happy': 'happiness', 'joy': 'happiness',
    'sadness': 'sadness', 'sad': 'sadness',
    'surprise': 'surprise', 'surprised': 'surprise',
}

# FACS names (Ekman, Friesen & Hager 2002) of every AU the region table places on the face.
FACS_NAMES: Dict[str, str] = {
    'AU1': 'inner brow raiser',
    'AU2': 'outer brow raiser',
    'AU4': 'brow lowerer',
    'AU5': 'upper lid raiser',
    'AU6': 'cheek raiser',
    'AU7': 'lid tightener',
    'AU9': 'nose wrinkler',
    'AU10': 'upper lip raiser',
    'AU11': 'nasolabial deepener',
    'AU12': 'lip corner puller',
    'AU13': 'sharp lip puller',
    'AU14': 'dimpler',
    'AU15': 'lip corner depressor',
    'AU16': 'lower lip depressor',
    'AU17': 'chin raiser',
    'AU18': 'lip pucker',
    'AU20': 'lip stretcher',
    'AU22': 'lip funneler',
    'AU23': 'lip tightener',
    'AU24': 'lip pressor',
    'AU25': 'lips part',
    'AU26': 'jaw drop',
    'AU27': 'mouth stretch',
    'AU28': 'lip suck',
    'AU43': 'eyes closed',
    'AU45': 'blink',
    'AU46': 'wink',
}

# The face area each AU is read from (paper 3.3 / DESIGN.md section 3). The region layouts below say which
# boxes of the feature map look at which areas.
AU_AREAS: Dict[str, str] = {
    'AU1': 'eye', 'AU2': 'eye', 'AU5': 'eye', 'AU7': 'eye', 'AU43': 'eye', 'AU45': 'eye', 'AU46': 'eye',
    'AU4': 'brows',
    'AU6': 'cheek',
    'AU9': 'nose',
    'AU10': 'mouth', 'AU11': 'mouth', 'AU12': 'mouth', 'AU13': 'mouth', 'AU14': 'mouth', 'AU15': 'mouth',
    'AU16': 'mouth', 'AU17': 'mouth', 'AU18': 'mouth', 'AU20': 'mouth', 'AU22': 'mouth', 'AU23': 'mouth',
    'AU24': 'mouth', 'AU25': 'mouth', 'AU26': 'mouth', 'AU27': 'mouth', 'AU28': 'mouth',
}

AU_SETS: Dict[str, Tuple[str, ...]] = {
    # RAF-AU, the 21 AUs the paper keeps (section 4.3)
    'rafau21': tuple(f'AU{i}' for i in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 18, 20, 22, 23, 24, 25, 26, 27)),
    # OpenFace 2.x AU presence/intensity outputs the paper uses as pseudo-labels (section 4.3)
    'openface16': tuple(f'AU{i}' for i in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26)),
}

# Region boxes are given in cells of a GRID x GRID map (14 x 14 for a 112 x 112 face), i.e. as fractions of
# the map, so a map of another size scales them.
GRID = 14


@dataclass(frozen=True)
class Region:
    """A box of the AU feature map and the face areas whose AUs it predicts.

    Attributes:
        name: what the box covers, in image terms (`eye_left` is the eye on the image's left).
        rows: half-open row range in cells of a GRID x GRID map.
        cols: half-open column range in cells of a GRID x GRID map.
        areas: face areas (values of AU_AREAS) whose AUs this box predicts.
    """
    name: str
    rows: Tuple[int, int]
    cols: Tuple[int, int]
    areas: Tuple[str, ...]

    def cells(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """Row start, row end, col start, col end of this box on a height x width map (never empty)."""
        r0, r1 = (self.rows[0] * height) // GRID, -((-self.rows[1] * height) // GRID)
        c0, c1 = (self.cols[0] * width) // GRID, -((-self.cols[1] * width) // GRID)
        return r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)


# Regions that predict the same areas are a symmetric pair: their logits are combined by an element-wise max
# (the paper's symmetric maxout).
REGION_LAYOUTS: Dict[str, Tuple[Region, ...]] = {
    # paper section 3.3 / DESIGN.md: seven overlapping boxes
    'paper7': (
        Region('eye_left', (0, 7), (0, 7), ('eye',)),
        Region('between_brows', (0, 7), (4, 10), ('brows',)),
        Region('eye_right', (0, 7), (7, 14), ('eye',)),
        Region('cheek_left', (5, 12), (0, 6), ('cheek',)),
        Region('nose', (4, 10), (4, 10), ('nose',)),
        Region('cheek_right', (5, 12), (8, 14), ('cheek',)),
        Region('mouth', (6, 14), (0, 14), ('mouth',)),
    ),
    # the authors' released code: an upper and a lower half, overlapping by two rows
    'released2': (
        Region('upper', (0, 8), (0, 14), ('eye', 'brows', 'cheek', 'nose')),
        Region('lower', (6, 14), (0, 14), ('mouth',)),
    ),
}


def au_name(au: Union[str, int]) -> str:
    """Canonical AU name ('AU12') for '12', 12, 'au12' or 'AU12'."""
    text = str(au).strip().upper()
    if not text.startswith('AU'):
        text = 'AU' + text
    try:
        return f'AU{int(text[2:])}'
    except ValueError:
        raise ValueError(f'{au!r} is not an AU name; write AU names like "AU12" or numbers like 12.') from None


def resolve_aus(aus: Union[str, Sequence[Union[str, int]], None]) -> Tuple[str, ...]:
    """Resolve an AU label set name ('rafau21', 'openface16') or a user's own AU list to canonical names.

    Raises:
        ValueError: for an unknown set name, a duplicate, or an AU the region table does not place.
    """
    if aus is None:
        return ()
    if isinstance(aus, str):
        if aus not in AU_SETS:
            raise ValueError(
                f'Unknown AU label set {aus!r}. Known sets: {", ".join(AU_SETS)}; or pass a list of AUs, '
                f'e.g. ["AU6", "AU12"].')
        return AU_SETS[aus]
    names = [au_name(a) for a in aus]
    unknown = [n for n in names if n not in AU_AREAS]
    if unknown:
        raise ValueError(
            f'AU(s) {", ".join(unknown)} have no face region in aucvt_zoo.labels.AU_AREAS, so no AU head can '
            f'predict them. Known AUs: {", ".join(sorted(AU_AREAS, key=lambda a: int(a[2:])))}.')
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f'AU(s) {", ".join(duplicates)} appear more than once in the AU list {list(aus)}.')
    return tuple(names)


def expression_index(name: str) -> int:
    """Index of an expression given its name or a known folder alias, case-insensitively ('ANGRER' -> 0)."""
    key = name.strip().lower()
    if key not in EXPRESSION_ALIASES:
        raise ValueError(
            f'{name!r} is not one of the 6 expressions ({", ".join(EXPRESSIONS)}) or a known alias '
            f'({", ".join(sorted(EXPRESSION_ALIASES))}).')
    return EXPRESSIONS.index(EXPRESSION_ALIASES[key])


def regions_for(aus: Sequence[str], layout: str = 'paper7') -> List[Tuple[Region, Tuple[str, ...]]]:
    """The regions of a layout that have AUs to predict, each with its AUs in label-set order."""
    if layout not in REGION_LAYOUTS:
        raise ValueError(f'Unknown AU region layout {layout!r}; known layouts: {", ".join(REGION_LAYOUTS)}.')
    out = []
    for region in REGION_LAYOUTS[layout]:
        region_aus = tuple(a for a in aus if AU_AREAS[a] in region.areas)
        if region_aus:
            out.append((region, region_aus))
    return out
