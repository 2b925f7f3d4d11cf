"""Place maps: descriptors of known places in segments on disk, a FAISS index over them, and
versions that list the segments, switched atomically. See layout.py for the folder, store.py
for streaming, index.py for the index and when it is retrained, lock.py for one writer at a
time and readers' leases, reader.py for what loading verifies."""
from .identity import bundle_identity, check_compatible, weights_identity
from .index import FLAT_MAX, INDEX_TYPES, IVFPQ_MIN, choose_index, index_bytes
from .layout import FORMAT_VERSION, MapError, is_map
from .reader import PlaceMap, load_map, map_info, verify_map
from .store import check_finite
from .writer import (
                     MapWriter,
                     add_to_map,
                     open_add,
                     open_build,
                     poses_for,
                     read_pose_table,
                     read_poses,
                     save_map,
                     set_metadata,
)

__all__ = ["FLAT_MAX", "FORMAT_VERSION", "INDEX_TYPES", "IVFPQ_MIN", "MapError", "MapWriter", "PlaceMap",
           "add_to_map", "bundle_identity", "check_compatible", "check_finite", "choose_index", "index_bytes",
           "is_map", "load_map", "map_info", "open_add", "open_build", "poses_for", "read_pose_table", "read_poses",
           "save_map", "set_metadata", "verify_map", "weights_identity"]
