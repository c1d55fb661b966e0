"""Layer 2, ``io``: file formats, DICOM discovery and series filters, readers, writers, input discovery.

- :mod:`.formats`: suffixes of volumes, 2D images and DICOM files; NIfTI completeness;
- :mod:`.dicom`: every DICOM series of a folder, described from its headers (:class:`DicomSeries`);
- :mod:`.series_filters`: ``--series-filter`` terms;
- :mod:`.readers`: :func:`read_image` (NIfTI, NRRD, MHA/MHD, DICOM, PNG/JPEG/TIFF/BMP);
- :mod:`.writers`: :func:`write_image` (exact geometry, atomic, verified);
- :mod:`.discovery`: the inputs under a folder (:func:`list_images`, :func:`walk_inputs`);
- :mod:`.subjects`: subject names of normal files.
"""

from .dicom import DicomSeries, find_series, select_series
from .discovery import list_images, walk_inputs
from .formats import IMAGE_SUFFIXES, VOLUME_SUFFIXES, strip_suffix
from .readers import read_image
from .series_filters import SeriesFilter, parse_series_filters
from .writers import write_image

__all__ = [
    "IMAGE_SUFFIXES",
    "VOLUME_SUFFIXES",
    "DicomSeries",
    "SeriesFilter",
    "find_series",
    "list_images",
    "parse_series_filters",
    "read_image",
    "select_series",
    "strip_suffix",
    "walk_inputs",
    "write_image",
]
