"""specialize.aligner: align teacher top-k distributions onto student tokens.

`align` (one pair, mapping.py), `align_codes` / `align_codes_many` (Numba DP, dp.py),
`map_distributions` (top-k → student ids), `align_teacher_dir` (bulk: packed.py by default,
bulk.py), `AlignedShards` / `write_shards` (on-disk format, shards.py), `TeacherRecordError`
(records.py). Importing the aligner imports neither specialize.engine nor transformers.
"""
from .bulk import align_teacher_dir
from .dp import align_codes, align_codes_many
from .mapping import Alignment, MappingStats, StudentVocab, align, map_distributions
from .records import TeacherRecordError
from .shards import AlignedShards, write_shards

__all__ = ["align", "Alignment", "align_codes", "align_codes_many", "map_distributions", "MappingStats",
           "StudentVocab", "align_teacher_dir", "AlignedShards", "write_shards", "TeacherRecordError"]
