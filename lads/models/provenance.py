"""What images the visual backbone's starting weights saw, and whether those include the
evaluation images of the data trained on (docs/design.md §4a, "Leak-free initialisation").

COCO's training images hold every RefCOCO, RefCOCO+ and RefCOCOg val and test image, so a detector
trained on all of COCO (DETR's published weights) has seen the images every RefCOCO/+/g number is
measured on. TransVG publishes one DETR-R50 per dataset family trained without them; ``lads
pretrain`` writes its own, with what it left out in the file's metadata. A run whose starting
weights saw its evaluation images is refused unless ``model.visual.allow_eval_overlap`` is set,
and then every table of its figures says so first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lads.errors import LadsError

METADATA_KEY = "lads.provenance"  # safetensors metadata of lads pretrain's weights
TRANSVG_WEIGHTS = "https://drive.google.com/drive/folders/1SOHPCCR6yElQmVp96LGJhfTP46RxVwzF"
OVERLAP_WARNING = ("started from visual weights that saw evaluation images "
                   "(model.visual.allow_eval_overlap=true): not comparable with leak-free figures")

# a TransVG split folder stands for the REFER dataset it was made from
TRANSVG_AS_REFER = {"transvg/unc": "refcoco/unc", "transvg/unc+": "refcoco+/unc", "transvg/gref": "refcocog/google",
                    "transvg/gref_umd": "refcocog/umd", "transvg/referit": "refclef/berkeley"}


@dataclass(frozen=True)
class Provenance:
    """The image collection weights were trained on ("coco", "synthetic", ...), the evaluation
    sets (``refcoco/unc``, ...) whose val and test images were left out, and a line for messages."""

    images: str
    excluded: frozenset
    note: str

    def to_metadata(self) -> dict:
        return {METADATA_KEY: json.dumps({"images": self.images, "excluded": sorted(self.excluded), "note": self.note})}


def _transvg(excluded, what):
    return Provenance("coco", frozenset(excluded), f"TransVG's DETR-R50 for {what}, trained on COCO without "
                                                    "that family's val and test images")


_STOCK_DETR = Provenance("coco", frozenset(), "DETR trained on all of COCO 2017 train, which holds every "
                                              "RefCOCO/+/g val and test image")
TRANSVG_DETR = {  # TransVG's train.sh: unc and unc+ start from the first, gref and gref_umd the second
    "detr-r50-unc.pth": _transvg({"refcoco/unc", "refcoco+/unc"}, "RefCOCO and RefCOCO+"),
    "detr-r50-gref.pth": _transvg({"refcocog/umd", "refcocog/google"}, "RefCOCOg"),
    "detr-r50-referit.pth": _transvg(set(), "ReferItGame (whose images are not COCO's)"),
}
KNOWN_WEIGHTS = {  # file name (as published, or as TransVG's download script renames them) -> provenance
    **{name: _STOCK_DETR for name in ("detr-r50-e632da11.pth", "detr-r50-dc5-f0fb7ef5.pth", "detr-r101-2c7b67e5.pth",
                                      "detr-r101-dc5-a2e86def.pth", "detr-r50.pth", "detr-r101.pth")},
    **TRANSVG_DETR,
    "resnet50-0676ba61.pth": Provenance("imagenet", frozenset(), "torchvision's ImageNet ResNet-50"),
}
STOCK_DETR_HASHES = ("e632da11", "f0fb7ef5", "2c7b67e5", "a2e86def")  # SHA-256 prefixes: a renamed copy is known too


def where_to_get(source: str) -> str:
    """What to do about missing weights: where the known ones are published, or how to make them."""
    name = Path(source).name
    if name in TRANSVG_DETR:
        return (f"{TRANSVG_DETR[name].note}: download {name} from TransVG's checkpoints ({TRANSVG_WEIGHTS}) "
                f"into {Path(source).parent}/, or make leak-free weights with lads pretrain --config pretrain-coco "
                "(docs/data.md, \"Leak-free weights\")")
    if source.endswith(".safetensors"):
        return ("Make it with lads pretrain (the pretrain-coco preset writes leak-free ResNet-50 weights "
                "for RefCOCO/+/g)")
    return "Give the path of a torchvision-layout ResNet or a DETR checkpoint"


def image_collection(dataset: str) -> str | None:
    """The images an evaluation set shows: RefCOCO/+/g COCO's, ReferIt (``refclef``) SAIAPR TC-12's."""
    name = dataset.split("/")[0]
    return "coco" if name.startswith("refcoco") else "saiapr" if name == "refclef" else None


def provenance_of(source: str) -> Provenance | None:
    """The provenance of ``model.visual.pretrained``: a lads pretrain file's metadata, a known
    file name, a stock DETR file by its hash; None when unknown (or the file is not here)."""
    name = Path(urlparse(source).path).name
    if name in KNOWN_WEIGHTS:
        return KNOWN_WEIGHTS[name]
    path = Path(source)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(METADATA_KEY)
        if recorded is None:
            return None
        data = json.loads(recorded)
        return Provenance(data["images"], frozenset(data["excluded"]), data["note"])
    from lads.util.download import sha256

    return _STOCK_DETR if sha256(path).startswith(STOCK_DETR_HASHES) else None


def evaluation_key(data_path, split_by=None) -> str | None:
    """The evaluation set a dataset path stands for (``refcoco/unc``, …; a TransVG split folder
    as the REFER dataset it was made from), or None for data with no known key."""
    from lads.datasets.check import dataset_key

    key = dataset_key(data_path, split_by)
    return TRANSVG_AS_REFER.get(key, key)


def overlap(source: str, saw: Provenance | None, key: str) -> str | None:
    """A sentence saying that weights ``source`` of provenance ``saw`` saw the val and test images
    of evaluation set ``key``; None when they did not, or their provenance is unknown."""
    if saw is None or saw.images != image_collection(key) or key in saw.excluded:
        return None
    return f"{source}: {saw.note}; it saw the val and test images of {key}"


def eval_overlap(source: str, data_path: str, split_by=None) -> tuple[str | None, str | None]:
    """``(evaluation set, overlap)`` of weights ``source`` and the data at ``data_path``: the set's
    key (None for data with no known evaluation images) and ``overlap``'s sentence."""
    key = evaluation_key(data_path, split_by)
    if key is None or image_collection(key) is None:
        return None, None
    return key, overlap(source, provenance_of(source), key)


def check_eval_overlap(model_cfg, data_cfg, init_config: dict | None = None, say=print) -> None:
    """Refuse starting weights that saw the evaluation images of ``data_cfg.path`` unless
    ``model_cfg.visual.allow_eval_overlap``. With ``init_config`` (the saved config of
    ``model.init``) the weights come from that run: its start and its flag count."""
    allowed = model_cfg.visual.allow_eval_overlap
    if init_config is not None and init_config["model"]["visual"].get("allow_eval_overlap") and not allowed:
        raise LadsError(f"model.init={model_cfg.init} was trained with model.visual.allow_eval_overlap=true: its "
                        "weights may have seen evaluation images. Set model.visual.allow_eval_overlap=true here "
                        "too, on purpose, or start from leak-free weights (docs/data.md, \"Leak-free weights\")")
    source = (init_config["model"]["visual"].get("pretrained") if init_config is not None
              else model_cfg.visual.pretrained)
    if not source or not data_cfg.path:
        return
    key = evaluation_key(data_cfg.path, data_cfg.split_by)
    if key is None or image_collection(key) is None:
        return
    saw = provenance_of(source)
    if saw is None:
        if Path(source).is_file():
            say(f"model.visual.pretrained={source}: what it was trained on is unknown here; make sure it "
                f"did not see the val and test images of {key}")
        return
    found = overlap(source, saw, key)
    if found is None:
        return
    if not allowed:
        raise LadsError(f"model.visual.pretrained={found}. Start from leak-free weights (docs/data.md, "
                        "\"Leak-free weights\"), or set model.visual.allow_eval_overlap=true on purpose: "
                        "every table of this run's figures then says so")
    say(f"warning: {found} (model.visual.allow_eval_overlap=true)")
