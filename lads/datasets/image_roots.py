"""Where a dataset's images are, when ``image_root`` is not given (docs/data.md, "Image paths").

The annotation files name images relative to a folder that each toolkit puts somewhere else:
the REFER toolkit beside the datasets (``data/images/mscoco/images/train2014``), TransVG under
``ln_data/`` beside its ``data/`` split files, Flickr30k Entities and Visual Genome inside their
own folder. ``find_image_root`` tries the dataset's own default first, then every known layout
relative to the dataset's folder and its ancestors, and keeps the first folder that holds the
dataset's first image: a folder that merely exists is not taken for the right one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ANCESTORS = 3  # how far above the dataset's folder a layout's root may be

# image collection -> (folder relative to the dataset's folder or an ancestor, layout name)
LAYOUTS = {
    "coco": (("images/mscoco/images/train2014", "REFER toolkit"),
             ("ln_data/other/images/mscoco/images/train2014", "TransVG"),
             ("other/images/mscoco/images/train2014", "TransVG"),
             ("coco/train2014", "COCO"),
             ("coco/images/train2014", "COCO"),
             ("images/train2014", "COCO"),
             ("train2014", "COCO")),
    "saiapr": (("images/saiapr_tc-12", "REFER toolkit"),
               ("ln_data/referit/images", "TransVG"),
               ("referit/images", "TransVG")),
    "flickr30k": (("flickr30k-images", "Flickr30k Entities"),
                  ("images/flickr30k-images", "Flickr30k Entities"),
                  ("ln_data/Flickr30k/flickr30k_images", "TransVG"),
                  ("Flickr30k/flickr30k_images", "TransVG")),
    "visual_genome": (("images/visual_genome", "Visual Genome"),
                      ("visual_genome", "Visual Genome")),
}


@dataclass(frozen=True)
class ImageRoot:
    """The folder image names are resolved against, and how it was chosen."""

    path: Path
    how: str  # "given", "default", "found (<layout> layout)" or "default; not found …"

    def describe(self) -> str:
        return f"images in {self.path} ({self.how})"


def find_image_root(given, default: Path, start: Path | None = None, collections=(),
                    sample: str | None = None) -> ImageRoot:
    """``given`` if not None; else the first of ``default`` and the ``LAYOUTS`` of ``collections``
    (relative to ``start`` and its ``ANCESTORS`` parents) that holds the image ``sample`` (a name
    relative to the root); ``default`` when there is no sample or none holds it."""
    if given is not None:
        return ImageRoot(Path(given), "given")
    if sample is None or (default / sample).is_file():
        return ImageRoot(default, "default")
    tried = [default]
    start = start.absolute()
    for base in [start, *list(start.parents)[:ANCESTORS]]:
        for collection in collections:
            for relative, layout in LAYOUTS[collection]:
                root = base / relative
                if (root / sample).is_file():
                    return ImageRoot(root, f"found: {layout} layout")
                tried.append(root)
    looked = ", ".join(str(t) for t in dict.fromkeys(tried[:6]))
    return ImageRoot(default, f"default; {sample} is in none of {looked}, …: give the image folder")

