"""Model specs that name a Hugging Face Hub repository ('org/name'), fetched through huggingface_hub into
its usual cache (HF_HUB_CACHE) or found there offline (HF_HUB_OFFLINE=1, or no network)."""

from __future__ import annotations

import os
import re

from .errors import DDTreeError

# What loading reads: configs, tokenizers, the safetensors index and chat templates; weights apart.
CONFIG_PATTERNS = ["*.json", "tokenizer.model", "merges.txt", "*.jinja"]
WEIGHT_PATTERNS = ["*.safetensors"]
# The Hub's rule for a repo id: a namespace and a name of letters, digits, '-', '_' and '.'.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_repo_id(spec: str) -> bool:
    return REPO_ID.fullmatch(spec) is not None and ".." not in spec


def local_model_dir(spec: str, what: str, weights: bool = True) -> str:
    """`spec` itself where it exists (or names nothing that could be on the Hub), else the snapshot
    of the Hub repo `spec`, downloaded where the cache lacks it; without `weights` only its configs and
    tokenizer files are fetched."""
    if os.path.exists(spec) or not is_repo_id(spec):
        return spec
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = CONFIG_PATTERNS + (WEIGHT_PATTERNS if weights else [])
    try:
        return snapshot_download(spec, allow_patterns=patterns)
    except LocalEntryNotFoundError:  # offline or the Hub unreachable, and the cache lacks (some of) it
        raise DDTreeError(
            f"{what}: {spec} is not a local directory, the Hugging Face cache does not hold it (or not all of it) "
            f"and the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1); download it where you have network "
            f"with `hf download {spec} --local-dir DIR` (`huggingface-cli download` in older huggingface_hub) "
            "and pass DIR") from None
    except Exception as exc:  # huggingface_hub raises its own errors, httpx's and OSError: no such repo, gated, ...
        raise DDTreeError(f"{what}: cannot fetch {spec} from the Hugging Face Hub: "
                          f"{' '.join(str(exc).split())[:300]}") from None
