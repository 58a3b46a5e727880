"""Sharded data under `torchrun --nproc_per_node 2` (gloo, CPU): disjoint shards covering the set once per epoch,
labels from folder names, same seed same order, resume continues the order; torch and DALI backends agree."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from dtfast.data.dali import dali_available

pytestmark = pytest.mark.multiproc
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES, BATCH, WORLD = 24, 3, 2  # 12 per rank -> 4 steps per epoch

WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from dtfast.data import build_dataset, build_loader
    from dtfast.data.dali import DaliLoader, dali_available


    def main():
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        root, out = sys.argv[1], sys.argv[2]
        data = build_dataset(root, 8, split="val")  # centre crops of flat images: the pixel identifies the file

        def order(loader):
            seen = []
            for images, labels in loader:
                seen += [[int(image[0, 4, 4]), int(image[1, 4, 4]), int(label)] for image, label in zip(images, labels)]
            return seen

        common = dict(rank=rank, world_size=world, seed=7)
        runs = {
            "epoch0": order(build_loader(data, 3, num_workers=1, **common)),
            "epoch0_again": order(build_loader(data, 3, num_workers=0, **common)),
            "epoch1": order(build_loader(data, 3, num_workers=0, start_step=4, **common)),
            "resume2": order(build_loader(data, 3, num_workers=0, start_step=2, **common)),
        }
        if dali_available():
            runs["dali_epoch0"] = order(DaliLoader(data, 3, num_threads=1, **common))
            runs["dali_resume2"] = order(DaliLoader(data, 3, num_threads=1, start_step=2, **common))
        runs["classes"] = data.classes
        dist.barrier()
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(runs, handle)
        dist.destroy_process_group()


    if __name__ == "__main__":  # DataLoader workers start from a fork server and import this script
        main()
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat_images")
    for image_id in range(NUM_IMAGES):
        label = image_id % 4
        os.makedirs(root / f"class{label}", exist_ok=True)
        pixels = np.empty((12, 16, 3), dtype=np.uint8)
        pixels[...] = (image_id * 10, label * 50, 7)
        Image.fromarray(pixels).save(root / f"class{label}" / f"{image_id:03d}.png")
    out = tmp_path_factory.mktemp("out")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               str(script), str(root), str(out)]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _ids(run):
    return [image_id // 10 for image_id, _, _ in run]


def test_shards_are_disjoint_and_cover_the_set_each_epoch(runs):
    for key in ("epoch0", "epoch1"):
        shards = [_ids(rank_runs[key]) for rank_runs in runs]
        assert [len(s) for s in shards] == [NUM_IMAGES // WORLD] * WORLD  # same number of steps on every rank
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(NUM_IMAGES))


def test_labels_match_folder_names(runs):
    for rank_runs in runs:
        classes = rank_runs["classes"]
        assert classes == ["class0", "class1", "class2", "class3"]
        for image_id, green, label in rank_runs["epoch0"]:
            assert classes[label] == f"class{green // 50}" == f"class{(image_id // 10) % 4}"


def test_same_seed_same_order_and_new_epoch_new_order(runs):
    for rank_runs in runs:
        assert rank_runs["epoch0"] == rank_runs["epoch0_again"]
        assert _ids(rank_runs["epoch0"]) != _ids(rank_runs["epoch1"])


def test_resume_continues_the_order(runs):
    for rank_runs in runs:
        assert rank_runs["resume2"] == rank_runs["epoch0"][2 * BATCH:]


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_shards_follow_the_same_order(runs):
    for rank_runs in runs:
        assert rank_runs["dali_epoch0"] == rank_runs["epoch0"]
        assert rank_runs["dali_resume2"] == rank_runs["epoch0"][2 * BATCH:]
