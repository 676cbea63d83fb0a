"""Quality profiles: fixed, documented recipes turning backbone vectors into search vectors.

``--quality=fast|balanced|best`` picks one :class:`Recipe`; the individual knobs
(``--whiten_dim``, ``--whiten_power``, ``--whiten_shrinkage``, ``--dba_k``,
``--dba_alpha``) override single fields of it. A recipe has two parts:

* per image (model layer, before ``features/``): the backbone, test-time
  augmentation. What ``features/`` stores is this backbone vector, so later runs
  reuse it;
* per catalogue (``pipeline.postprocess``, recomputed every run from the backbone
  vectors, never reused): PCA whitening fitted on the run's own vectors, then
  database-side augmentation (DBA) on the whitened vectors' kNN graph. The result
  is the *search space*: what ``index/vectors.npy`` holds and what ``similarity``
  is the cosine in.

The recipes were chosen by ``bench/quality_candidates.py`` on the shared products
(see the README's quality table); nothing in them was learned from labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PROFILES_ORDER = ("fast", "balanced", "best")
# Not yet balanced, although it met the P@10 >= 0.77 target on the shared products
# (bench/MEASUREMENTS.md, "Quality recipes"): its per-catalogue steps (PCA fit, then
# DBA's exact kNN graph, N^2)
# run on all vectors in one worker (transforms/search_space.py), which a
# million-product nightly run cannot afford, and it changes every run's
# similarities (duplicate groups included). Issue 20 tracks the switch.
DEFAULT_PROFILE = "fast"


@dataclass(frozen=True)
class Recipe:
    """One profile's settings; ``whiten_dim == 0`` and ``dba_k == 0`` mean "off"."""

    profile: str
    whiten_dim: int = 0  # PCA axes kept (0: no whitening / PCA at all)
    whiten_power: float = 0.0  # eigenvalue ** -power per axis (0: PCA, 0.5: full whitening)
    whiten_shrinkage: float = 0.0  # added to the eigenvalues, as a multiple of their mean
    dba_k: int = 0  # neighbours averaged into each vector (0: no DBA)
    dba_alpha: float = 3.0  # neighbour weight = similarity ** alpha

    @property
    def postprocessed(self) -> bool:
        """Whether the search space differs from the backbone vectors."""
        return self.whiten_dim > 0 or self.dba_k > 0

    def to_dict(self) -> dict:
        """Plain values for manifest.json and index/space.json."""
        return dataclasses.asdict(self)

    def similarity_definition(self) -> str:
        """What the ``similarity`` of a neighbour is under this recipe, in one sentence."""
        if not self.postprocessed:
            return "cosine of the L2-normalised backbone vectors"
        steps = []
        if self.whiten_dim:
            steps.append(f"PCA-whitened to {self.whiten_dim} dimensions "
                         f"(power {self.whiten_power}, shrinkage {self.whiten_shrinkage}) "
                         "fitted on the run's own vectors")
        if self.dba_k:
            steps.append(f"each averaged with its {self.dba_k} nearest neighbours "
                         f"(weights similarity^{self.dba_alpha:g})")
        return "cosine of the backbone vectors " + ", then ".join(steps)


PROFILES: dict[str, Recipe] = {
    # Today's path, unchanged: the backbone vectors searched as they are.
    "fast": Recipe("fast"),
    # Same embedding cost as fast (post-processing only): PCA to 256 axes with
    # partial whitening (each axis scaled by eigenvalue ** -0.2; 0 is plain PCA,
    # 0.5 full whitening), then DBA on the 10 nearest. bench/quality_candidates.py on the shared
    # products: power 0.15-0.25 at 256-512 axes formed a plateau, above plain PCA and full
    # whitening; 0.2 is its middle. Figures: bench/MEASUREMENTS.md, "Quality recipes", and
    # README, "Quality profiles".
    "balanced": Recipe("balanced", whiten_dim=256, whiten_power=0.2, dba_k=10, dba_alpha=3.0),
    # More axes kept, with the milder power that scored best at 512 (on Lite0 in the
    # same sweep). On Lite0 it is no better than balanced: it pays off with the
    # stronger backbone (--model=efficientnet_lite2, README "Quality profiles").
    "best": Recipe("best", whiten_dim=512, whiten_power=0.15, dba_k=10, dba_alpha=3.0),
}

# Knob name (option) → Recipe field it overrides.
KNOBS = ("whiten_dim", "whiten_power", "whiten_shrinkage", "dba_k", "dba_alpha")


def recipe_for(profile: str, **overrides) -> Recipe:
    """The profile's recipe with every override that is not None applied.

    Raises ValueError with one sentence for an unknown profile or knob value.
    """
    if profile not in PROFILES:
        raise ValueError(f"--quality must be one of {', '.join(PROFILES_ORDER)}, got "
                         f"{profile!r}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown quality knobs {unknown}")
    recipe = dataclasses.replace(PROFILES[profile], **changes)
    if recipe.whiten_dim < 0:
        raise ValueError(f"--whiten_dim must be 0 (off) or positive, got {recipe.whiten_dim}")
    if recipe.dba_k < 0:
        raise ValueError(f"--dba_k must be 0 (off) or positive, got {recipe.dba_k}")
    if not 0 <= recipe.whiten_power <= 1:
        raise ValueError(f"--whiten_power must be within [0, 1], got {recipe.whiten_power}")
    if recipe.whiten_shrinkage < 0:
        raise ValueError(f"--whiten_shrinkage must be >= 0, got {recipe.whiten_shrinkage}")
    if recipe.dba_alpha < 0:
        raise ValueError(f"--dba_alpha must be >= 0, got {recipe.dba_alpha}")
    return recipe
