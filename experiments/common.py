"""What every entry point shares: atomic files, videos, confidence intervals, clean errors."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# The hydra configs live at the top of the checkout (an absolute path: hydra reads a relative
# one as a module path when the app is a package module).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename onto `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
    return atomic_write(path, write)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: int) -> Path:
    """An H.264 mp4 of uint8 [H, W, 3] frames (imageio's bundled ffmpeg)."""
    import imageio.v2 as imageio

    def write(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264",
                                quality=8, macro_block_size=1) as w:
            for frame in frames:
                w.append_data(frame)
    return atomic_write(path, write)


def captioned(frame: np.ndarray, lines: Sequence[str], height: int = 0) -> np.ndarray:
    """The frame with a black caption strip of text lines underneath (for videos)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(10, frame.shape[1] // 24))
    line_h = font.size + 3
    strip = Image.new("RGB", (frame.shape[1], max(height, line_h * len(lines) + 4)))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * line_h), line, fill=(255, 255, 255), font=font)
    return np.concatenate([frame, np.asarray(strip)], axis=0)


def wrap_text(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sensible at 0% and 100%, unlike Wald)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def success_summary(successes: Sequence[bool], steps: Sequence[int]) -> dict:
    """Episodes, successes, rate, its 95% Wilson interval and mean steps, as results.json records them."""
    wins, n = int(sum(successes)), len(successes)
    return {"episodes": n, "successes": wins, "success_rate": wins / n, "ci95": list(wilson_interval(wins, n)),
            "mean_steps": float(np.mean(steps))}


def success_cells(r: dict) -> list[str]:
    """A success_summary as table cells: successes/episodes, rate, interval (in %)."""
    return [f"{r['successes']}/{r['episodes']}", f"{100 * r['success_rate']:.1f}%",
            f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)])


def clean_errors(main: Callable) -> Callable:
    """Entry points turn library errors into one clear line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, RuntimeError, FileNotFoundError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    return wrapper
