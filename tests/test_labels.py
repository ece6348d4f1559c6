import pytest

from aucvt_zoo import labels


def test_expressions_are_lsd_folders_sorted():
    assert labels.EXPRESSIONS == ('anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise')
    assert list(labels.EXPRESSIONS) == sorted(labels.EXPRESSIONS)


def test_au_sets_as_the_paper_lists_them():
    raf = [int(a[2:]) for a in labels.AU_SETS['rafau21']]
    assert raf == [1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 18, 20, 22, 23, 24, 25, 26, 27]
    openface = [int(a[2:]) for a in labels.AU_SETS['openface16']]
    assert openface == [1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26]


def test_every_known_au_has_a_facs_name_and_an_area():
    assert set(labels.FACS_NAMES) == set(labels.AU_AREAS)
    assert labels.FACS_NAMES['AU12'] == 'lip corner puller'
    for aus in labels.AU_SETS.values():
        assert all(a in labels.AU_AREAS for a in aus)


@pytest.mark.parametrize('given,expected', [(12, 'AU12'), ('12', 'AU12'), ('au12', 'AU12'), (' AU6 ', 'AU6')])
def test_au_name_normalises(given, expected):
    assert labels.au_name(given) == expected


def test_user_au_list_and_errors():
    assert labels.resolve_aus([6, 'AU12', 'au25']) == ('AU6', 'AU12', 'AU25')
    with pytest.raises(ValueError, match='AU99'):
        labels.resolve_aus(['AU6', 'AU99'])
    with pytest.raises(ValueError, match='Unknown AU label set'):
        labels.resolve_aus('rafau26')
    with pytest.raises(ValueError, match='more than once'):
        labels.resolve_aus(['AU6', 6])
    with pytest.raises(ValueError, match='not an AU name'):
        labels.resolve_aus(['smile'])


def test_expression_aliases_include_lsd_misspelling():
    assert labels.expression_index('ANGRER') == 0
    assert labels.expression_index('Happy') == 3
    with pytest.raises(ValueError, match='neutral'):
        labels.expression_index('neutral')


def test_paper7_layout_matches_design_table():
    boxes = {r.name: (r.rows, r.cols) for r in labels.REGION_LAYOUTS['paper7']}
    assert boxes == {
        'eye_left': ((0, 7), (0, 7)), 'between_brows': ((0, 7), (4, 10)), 'eye_right': ((0, 7), (7, 14)),
        'cheek_left': ((5, 12), (0, 6)), 'nose': ((4, 10), (4, 10)), 'cheek_right': ((5, 12), (8, 14)),
        'mouth': ((6, 14), (0, 14)),
    }
    per_region = dict((r.name, aus) for r, aus in labels.regions_for(labels.AU_SETS['rafau21']))
    assert per_region['eye_left'] == ('AU1', 'AU2', 'AU5', 'AU7')
    assert per_region['between_brows'] == ('AU4',)
    assert per_region['cheek_right'] == ('AU6',)
    assert per_region['nose'] == ('AU9',)
    assert len(per_region['mouth']) == 14


def test_released2_layout_splits_openface16_like_the_authors():
    per_region = dict((r.name, aus) for r, aus in labels.regions_for(labels.AU_SETS['openface16'], 'released2'))
    assert per_region['upper'] == ('AU1', 'AU2', 'AU4', 'AU5', 'AU6', 'AU7', 'AU9')
    assert per_region['lower'] == ('AU10', 'AU12', 'AU14', 'AU15', 'AU17', 'AU20', 'AU23', 'AU25', 'AU26')


def test_region_cells_scale_with_the_map():
    eye = labels.REGION_LAYOUTS['paper7'][0]
    assert eye.cells(14, 14) == (0, 7, 0, 7)
    assert eye.cells(7, 7) == (0, 4, 0, 4)  # rounded outwards, never empty
    assert eye.cells(28, 28) == (0, 14, 0, 14)
    with pytest.raises(ValueError, match='layout'):
        labels.regions_for(('AU6',), 'paper9')
