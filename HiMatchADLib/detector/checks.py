"""Does a query belong with the normal bank? Errors for a clear mismatch, warnings for one that may be meant."""

from __future__ import annotations

from typing import Optional

from ..core.digest import array_digest
from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..features.presets import resolve_modality
from ..features.canvas import has_physical_spacing
from ..features.slicing import SLICE_PLANES, PreparedVolume


def check_query_against_bank(bank_settings: dict, modality: str, img: Image, prep: PreparedVolume, manifest: Optional[dict] = None) -> list:
    """Query vs normal bank: an error for a clear mismatch, warnings for one that may be meant.

    Errors: a 3D volume against a bank of 2D slices; an explicitly given modality other than the
    bank's; with ``modality="auto"``, a query on the other side of the Hounsfield divide (CT vs
    not CT) from the bank. Warnings: a 2D slice against a bank of volumes; a query that looks
    like another modality than the bank's (explicit modality, or a non-CT difference); a query
    without a recorded pixel spacing against a bank resampled to one. With the bank's ``manifest``
    also errors for a query that is one of the normal images (the same voxels: it would be matched
    against itself and score near zero) and for a single slice in another anatomical plane than
    every normal slice (a sagittal slice against axial normals differs everywhere).
    """
    manifest = manifest or {}
    same = (manifest.get("voxel_digests") or {}).get(array_digest(img.array))
    if same is not None:
        raise HiMatchADError(
            f"{img.name} is one of the normal images ({same} in the normal folder holds the same voxels): it would be "
            "matched against itself and score near zero; remove it from the normal folder or choose other normals"
        )
    planes = manifest.get("slice_planes") or {}
    plane = SLICE_PLANES[prep.slice_axis_canonical]
    if planes and prep.n_slices == 1 and min(prep.native_shape[1:]) > 1 and has_physical_spacing(img) and plane not in planes:
        raise HiMatchADError(
            f"{img.name} is a single {plane} slice but the normal bank holds {' and '.join(sorted(planes))} slices only: "
            f"its anatomy would differ everywhere; use normals sliced the same way (--slice-axis {plane})"
        )
    st = bank_settings
    bank_mod, dims = st.get("modality", "auto"), st.get("dims", "")
    warn: list = []
    is_volume = not img.is_2d and prep.n_slices > 1
    if dims == "2d" and is_volume:
        raise HiMatchADError(
            f"{img.name} is a 3D volume but the normal bank holds 2D slices only: use a folder of normal volumes "
            "(or query 2D slices)"
        )
    if dims == "3d" and img.is_2d:
        warn.append(f"{img.name} is a 2D slice but the normal bank holds 3D volumes: it is matched without the slice-position prior")
    if bank_mod != "auto":
        if modality != "auto" and modality != bank_mod:
            raise HiMatchADError(f"modality {modality} was given but the normal bank was built with the {bank_mod} preset")
        looks = resolve_modality(img, "auto")
        if bank_mod == "8bit" and img.pixel_type == "uint16" and img.is_2d:
            looks = "8bit"  # a 16-bit PNG/TIFF: grey levels as a fraction of its full range, as the bank's
        if looks != bank_mod and {looks, bank_mod} != {"8bit", "oct"}:  # OCT B-scans are often 8-bit
            msg = f"{img.name} looks like {looks} but the normal bank is {bank_mod}"
            if modality == "auto" and "ct" in (looks, bank_mod):
                raise HiMatchADError(
                    f"{msg} (Hounsfield units on one side only): use normals of the query's modality, or pass "
                    f"--modality {bank_mod} to analyse it with the bank's preset anyway"
                )
            warn.append(f"{msg}: analysed with the bank's {bank_mod} preset")
    if st.get("pixel_spacing_mm") is not None and prep.plane is None:
        warn.append(
            f"{img.name} has no recorded pixel spacing: stretched to the model grid, so its anatomy may not have the "
            "size it has in the normal bank"
        )
    return warn
