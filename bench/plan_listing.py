"""Planning an ImageNet-sized ImageFolder: cutting 1,281,167 listed files into content-keyed units.

    python -m bench.plan_listing [--files 1281167] [--shard-size 1000]

Times the part of `erw precompute --dry-run` / the plan step that runs after the listing (which
is one paginated LIST on S3): class mapping, the content cut, and every unit's key. No file is
read. Prints the seconds, the unit count and the unit size spread.
"""

from __future__ import annotations

import argparse
import time

from erw import storage
from erw.data.sources import _image_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_281_167)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    files = [
        storage.FileInfo(f"n{i % 1000:08d}/img_{i:08d}.JPEG", 110_000 + i % 977, f"{i:032x}") for i in range(args.files)
    ]
    started = time.perf_counter()
    source = _image_folder("s3://bucket/imagenet/train", files, args.shard_size)
    seconds = time.perf_counter() - started
    sizes = sorted(u.size for u in source.units)
    print(
        f"{args.files} files -> {len(sizes)} units in {seconds:.1f} s; unit size min {sizes[0]}, "
        f"median {sizes[len(sizes) // 2]}, max {sizes[-1]}"
    )


if __name__ == "__main__":
    main()
