"""Quick-look pictures of exposures in the camera DAQ, for people.

A focal-plane mosaic of every detector read out (binned, overscan removed, on one zscale
stretch, as RubinTV shows exposures), or one detector at higher resolution; with
``truth=True`` the simulator's injected transients and variables are circled, so a person can
see what prompt processing should find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldf.errors import NotFoundError, UserInputError
from ldf.sim.camera import assemble
from ldf.sim.daq import DaqStore
from ldf.sim.instruments import Instrument
from ldf.sim.wcs import pixel_to_focal_plane

__all__ = ["quicklook"]


def _bin(image: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return image
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor).mean(axis=(1, 3))


def quicklook(
    daq: DaqStore,
    instrument: Instrument,
    day_obs: int,
    obs_id: str,
    out: Path,
    *,
    detector: str | None = None,
    truth_table: Path | None = None,
    max_pixels: int = 1600,
) -> Path:
    """Draw an exposure (or one detector of it) as a PNG.

    Parameters
    ----------
    daq
        Where the exposure's pixels are.
    instrument
        Its instrument, at the scale the night was simulated with.
    day_obs, obs_id
        Which exposure.
    out
        PNG to write (atomically).
    detector
        One detector's name; None draws every detector read out at its focal-plane place.
    truth_table
        The night's truth table (ECSV); its sources on this exposure are circled.
    max_pixels
        Longest side of the picture's data, in binned pixels.

    Raises
    ------
    NotFoundError
        The exposure, or the detector, is not in the DAQ.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.table import Table
    from astropy.visualization import ZScaleInterval
    from matplotlib.patches import Circle

    manifest = daq.exposure(instrument.name, day_obs, obs_id)
    names = list(manifest.detectors)
    if detector is not None:
        if detector not in names:
            raise NotFoundError(
                f"{obs_id}: detector {detector} was not read out; read: {', '.join(names)}"
            )
        names = [detector]
    if not names:
        raise NotFoundError(f"{obs_id}: no detector was read out")
    dets = [instrument.detector(n) for n in names]
    pix_mm = instrument.pixel_size_um / 1000.0
    # Extent of the drawing in focal-plane mm, and the binning that keeps it under max_pixels.
    x0 = min(d.fp_x_mm - d.nx * pix_mm / 2 for d in dets)
    x1 = max(d.fp_x_mm + d.nx * pix_mm / 2 for d in dets)
    y0 = min(d.fp_y_mm - d.ny * pix_mm / 2 for d in dets)
    y1 = max(d.fp_y_mm + d.ny * pix_mm / 2 for d in dets)
    factor = max(1, int(np.ceil(max(x1 - x0, y1 - y0) / pix_mm / max_pixels)))
    images = {}
    for d in dets:
        amps = daq.read_detector(instrument.name, day_obs, obs_id, d.name)
        images[d.name] = _bin(assemble(d, amps), factor)
    sample = np.concatenate([im[::4, ::4].ravel() for im in images.values()])
    vmin, vmax = ZScaleInterval().get_limits(sample)

    fig, ax = plt.subplots(figsize=(8, 8), dpi=120)
    for d in dets:
        half_w, half_h = d.nx * pix_mm / 2, d.ny * pix_mm / 2
        ax.imshow(
            images[d.name],
            origin="lower",
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
            extent=(d.fp_x_mm - half_w, d.fp_x_mm + half_w, d.fp_y_mm - half_h, d.fp_y_mm + half_h),
            interpolation="nearest",
        )
        if len(dets) > 1:
            ax.text(d.fp_x_mm, d.fp_y_mm + half_h, d.name, color="y", fontsize=6, ha="center")
    circled = 0
    if truth_table is not None and truth_table.exists():
        table = Table.read(truth_table, format="ascii.ecsv")
        rows = table[table["exposure_id"] == manifest.visit.exposure_id]
        for row in rows:
            if row["detector"] not in images:
                continue
            d = instrument.detector(str(row["detector"]))
            fx, fy = pixel_to_focal_plane(instrument, d, np.array(row["x"]), np.array(row["y"]))
            colour = "red" if row["kind"] == "transient" else "cyan"
            ax.add_patch(Circle((float(fx), float(fy)), 40 * pix_mm, fill=False, color=colour))
            circled += 1
    v = manifest.visit
    title = f"{obs_id} {v.obs_type.value} {v.physical_filter or ''} {v.exp_time_s:g}s"
    if circled:
        title += f" · {circled} truth sources (red transient, cyan variable)"
    ax.set_title(title, fontsize=9)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("focal plane x (mm)")
    ax.set_ylabel("focal plane y (mm)")
    if out.suffix.lower() != ".png":
        raise UserInputError(f"quick-look pictures are PNG; got {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
