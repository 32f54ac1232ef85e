"""The figures' text stays inside the figure."""

import pytest

from monai_cft.variables import variable_names

VARIABLES = variable_names(("lumen", "calcified", "noncalcified"), ("proximal", "mid", "distal"))
from monai_cft.visualize import wrap_title

LONG = ("[pos_seg] do(calcified_mid = 28.4 mm², factual 8.4): measured on counterfactual 23.2\n"
        "intended/measured: " + ", ".join(f"{v} 60.9/59.6" for v in VARIABLES if v != "calcified_mid"))


def _title_extent(title: str, width: float, fontsize: float = 8.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.0))
    canvas = FigureCanvasAgg(fig)
    text = fig.suptitle(wrap_title(title, width, fontsize), fontsize=fontsize)
    canvas.draw()
    return text.get_window_extent(renderer=canvas.get_renderer()), fig.bbox


@pytest.mark.parametrize("width", [6.0, 8.0, 12.0])
def test_long_panel_title_fits_the_figure(width):
    box, fig = _title_extent(LONG, width)
    assert box.x0 >= fig.x0 and box.x1 <= fig.x1, (box, fig)
    assert box.y1 <= fig.y1


def test_short_title_is_left_alone():
    assert wrap_title("do(calcified_mid = 28.4 mm²)", 6.0, 8) == "do(calcified_mid = 28.4 mm²)"
    assert wrap_title("a\nb", 6.0, 8) == "a\nb"


def test_unwrapped_long_title_would_run_off():  # the check above can fail
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0))
    canvas = FigureCanvasAgg(fig)
    text = fig.suptitle(LONG, fontsize=8)
    canvas.draw()
    box = text.get_window_extent(renderer=canvas.get_renderer())
    assert box.x0 < fig.bbox.x0 or box.x1 > fig.bbox.x1
