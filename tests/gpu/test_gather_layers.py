"""CopyQueue::copy_layers on a GPU, in one process (run on a machine with an NVIDIA GPU; skipped elsewhere with the
reason): one gather kernel copies the same chunks of many layers, each layer from its own bases, and marks each
layer landed. Checks every destination byte, including the guard bytes nobody addressed, and that the layer tokens
(not the event) said so before the bytes were read."""
import numpy as np
import pytest

from tests.gpu.conftest import requires_gpu

pytestmark = requires_gpu


def _layers(num_layers, num_blocks, chunk, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(0, 256, (num_blocks * chunk,), dtype=torch.uint8, generator=g).cuda()
           for _ in range(num_layers)]
    dst = [torch.full((num_blocks * chunk,), 0xA5, dtype=torch.uint8, device="cuda") for _ in range(num_layers)]
    torch.cuda.synchronize()  # kvxfer copies on a stream of its own, not ordered after torch's fills
    return src, dst


@pytest.mark.parametrize("num_layers,num_blocks,ids,chunk", [
    (32, 1024, 256, 2048),  # the reference shape, scaled down: about one chunk per block
    (2, 12000, 10000, 256),  # more chunks per block than its shared-memory cache holds (16): the rest read again
    (3, 64, 7, 4096),        # fewer chunks than blocks
    (256, 16, 5, 1048),      # the most layers one launch takes; chunks at odd blocks are not 16-byte aligned
    (4, 32, 9, 1001),        # odd chunk size: mostly unaligned, the byte path
    (4, 16, 5, (1 << 20) + 48),  # runs longer than a block's share: cut into 64 KiB pieces, a 48-byte last one
    (2, 8, 3, 300001),       # long and odd: pieces of an unaligned run, the byte path in each
])
def test_copy_layers_moves_every_layer_exactly(num_layers, num_blocks, ids, chunk):
    import torch

    from kvxfer import _C

    rng = np.random.default_rng(num_layers)
    src_ids = rng.choice(num_blocks, ids, replace=False)
    dst_ids = rng.choice(num_blocks, ids, replace=False)
    src, dst = _layers(num_layers, num_blocks, chunk, seed=num_blocks)
    rel_src = (src_ids * chunk).astype(np.uint64)
    rel_dst = (dst_ids * chunk).astype(np.uint64)
    sizes = np.full(ids, chunk, np.uint64)
    src_bases = np.array([t.data_ptr() for t in src], np.uint64)
    dst_bases = np.array([t.data_ptr() for t in dst], np.uint64)
    _C.gpu_copy_layers_seconds(torch.cuda.current_device(), rel_dst, rel_src, sizes, src_bases, dst_bases, 0)
    for layer in range(num_layers):
        want = np.full(num_blocks * chunk, 0xA5, np.uint8).reshape(num_blocks, chunk)
        want[dst_ids] = src[layer].cpu().numpy().reshape(num_blocks, chunk)[src_ids]
        np.testing.assert_array_equal(dst[layer].cpu().numpy().reshape(num_blocks, chunk), want)


@pytest.mark.parametrize("fence_kib", ["0", "7", "100000"])
@pytest.mark.parametrize("num_layers,num_blocks,ids,chunk", [(32, 1024, 256, 2048), (256, 16, 5, 1048)])
def test_copy_layers_fencing_once_per_group_of_layers_moves_every_layer_exactly(monkeypatch, fence_kib, num_layers,
                                                                                 num_blocks, ids, chunk):
    """KVXFER_GPU_FENCE_KIB: blocks fence after every layer (0), in groups that do not divide the layers (7 KiB: 4
    layers of 2 KiB a block, then 7 of 1048 bytes over 256 layers), or once for the whole launch; every layer is
    still marked landed only once all of it is there."""
    monkeypatch.setenv("KVXFER_GPU_FENCE_KIB", fence_kib)
    test_copy_layers_moves_every_layer_exactly(num_layers, num_blocks, ids, chunk)


def test_bad_fence_size_is_refused_naming_it(monkeypatch):
    import torch

    from kvxfer import _C, errors

    monkeypatch.setenv("KVXFER_GPU_FENCE_KIB", "-3")
    one = np.zeros(1, np.uint64)
    with pytest.raises(errors.InvalidArgument, match="KVXFER_GPU_FENCE_KIB='-3' is not a whole number"):
        _C.gpu_copy_layers_seconds(torch.cuda.current_device(), one, one, np.full(1, 256, np.uint64), one, one, 0)


def test_copy_layers_many_launches_reuse_the_completion_words():
    """More layer tokens than the queue has completion words (4096): words are reused by later launches and every
    launch still waits for its own layers."""
    import torch

    from kvxfer import _C

    src, dst = _layers(64, 8, 4096, seed=3)
    rel = np.array([0, 4096], np.uint64)
    sizes = np.full(2, 4096, np.uint64)
    t = _C.gpu_copy_layers_seconds(torch.cuda.current_device(), rel, rel[::-1].copy(), sizes,
                                   np.array([x.data_ptr() for x in src], np.uint64),
                                   np.array([x.data_ptr() for x in dst], np.uint64), 80)  # 81 x 64 = 5184 tokens
    assert t > 0
    for s_, d_ in zip(src, dst):
        s_, d_ = s_.cpu().numpy().reshape(8, 4096), d_.cpu().numpy().reshape(8, 4096)
        np.testing.assert_array_equal(d_[0], s_[1])
        np.testing.assert_array_equal(d_[1], s_[0])
        assert (d_[2:] == 0xA5).all()


def test_copy_layers_refused_when_launch_mode_is_per_layer(monkeypatch):
    import torch

    from kvxfer import _C, errors

    monkeypatch.setenv("KVXFER_GPU_LAUNCH", "per_layer")
    src, dst = _layers(1, 2, 256, seed=4)
    one = np.zeros(1, np.uint64)
    with pytest.raises(errors.TransportUnavailable, match="KVXFER_GPU_LAUNCH=per_layer"):
        _C.gpu_copy_layers_seconds(torch.cuda.current_device(), one, one, np.full(1, 256, np.uint64),
                                   np.array([src[0].data_ptr()], np.uint64),
                                   np.array([dst[0].data_ptr()], np.uint64), 0)


def test_bad_launch_mode_is_refused_naming_it(monkeypatch):
    import torch

    from kvxfer import _C, errors

    monkeypatch.setenv("KVXFER_GPU_LAUNCH", "sideways")
    one = np.zeros(1, np.uint64)
    with pytest.raises(errors.InvalidArgument, match="KVXFER_GPU_LAUNCH='sideways' is not one of batched, per_layer"):
        _C.gpu_copy_layers_seconds(torch.cuda.current_device(), one, one, np.full(1, 256, np.uint64), one, one, 0)
