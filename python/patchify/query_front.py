"""The query side shared by everything that is searched like an engine (`Patchify`, and the sharded index of
patchify.distributed): its encoder's settings, query descriptors, and `search` / `search_batch` over a ranking that
each implements (`_check_searchable`, `_ranked_hits`), so a server can hold either."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .encoder import Encoder
from .images import ImageSource
from .index.base import check_k
from .records import Hit

if TYPE_CHECKING:
    from .backbones import Backbone
    from .config import TilingConfig


class QueryFront:
    """Mixin: needs `_encoder` (an Encoder), `input_dim`, `_check_searchable()` and `_ranked_hits(vectors, k)`."""

    _encoder: Encoder

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    @property
    def tiling(self) -> "TilingConfig":
        return self._encoder.tiling

    @property
    def grids(self) -> tuple[int, ...]:
        return self.tiling.grids

    @property
    def levels(self) -> tuple[int, ...]:
        return self.tiling.levels

    @property
    def backbone(self) -> "Backbone":
        """The encoder's backbone, loaded on first use (searching by vector never loads it)."""
        return self._encoder.backbone

    @property
    def input_dim(self) -> int | None:
        raise NotImplementedError

    def embed_query(self, query: ImageSource | np.ndarray) -> np.ndarray:
        """The query's global descriptor (whole image, L2-normalised); a 1-D vector is passed through."""
        return self.embed_queries([query])[0]

    def embed_queries(self, queries: Sequence[ImageSource | np.ndarray]) -> np.ndarray:
        return self._encoder.embed_queries(queries, self.input_dim)

    def search(self, query: ImageSource | np.ndarray, k: int = 10) -> list[Hit]:
        """Top-k images for one query: a path, PIL image, HxWx3 uint8 array, or a descriptor (a 1-D float
        vector, or a (1, dim) row)."""
        if isinstance(query, np.ndarray) and query.ndim == 2 and np.issubdtype(query.dtype, np.floating):
            if query.shape[0] != 1:
                raise ValueError(f"search takes one query; a ({query.shape[0]}, {query.shape[1]}) array is a batch: "
                                 "use search_batch")
            query = query[0]
        return self.search_batch([query], k=k)[0]

    def search_batch(self, queries: Sequence[ImageSource | np.ndarray], k: int = 10) -> list[list[Hit]]:
        """Top-k images for each query; a 2-D float array is taken as a batch of descriptor vectors. At most
        n_images hits per query, whatever k."""
        if isinstance(queries, np.ndarray) and queries.ndim == 2:
            queries = list(queries)
        k = check_k(k)
        self._check_searchable()  # before encoding anything
        return self._ranked_hits(self.embed_queries(list(queries)), k)

    def _check_searchable(self) -> None:
        raise NotImplementedError

    def _ranked_hits(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        raise NotImplementedError
