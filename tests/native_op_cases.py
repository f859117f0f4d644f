"""Arguments for ``torch.library.opcheck`` of every native op, on the CPU or a CUDA device."""
import torch

from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout

OPS = ["fisher_accumulate", "select_mask", "mask_block_prefix", "grad_norm", "masked_perturb", "masked_restore",
       "key_histogram", "mask_from_threshold", "select_nm_mask"]


def opcheck_utils(op):
    """opcheck's default checks of ``op`` on this torch. torch < 2.5 cannot functionalize a mutated
    ``Tensor(a!)[]`` argument (auto_functionalize learnt lists in 2.5), so AOT dispatch, what
    torch.compile would do with the op, is checked from 2.5 on for the ops that mutate lists. FSAM calls
    them outside compiled graphs (compile the model, not the optimizer step), so they run on 2.4."""
    from torch.library import _OPCHECK_DEFAULT_UTILS as default

    mutates_list = any(
        a.alias_info is not None and a.alias_info.is_write and isinstance(a.type, torch.ListType)
        for a in op._schema.arguments
    )
    if mutates_list and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        return tuple(u for u in default if not u.startswith("test_aot_dispatch"))
    return default


def opcheck_cases(device="cpu"):
    g = torch.Generator().manual_seed(11)
    w = [torch.randn(s, generator=g).to(device) for s in (7, 600, 5)]
    gr = [torch.randn(s, generator=g).to(device) for s in (7, 600, 5)]
    lay = ParamLayout(w[:2], [True, True], [0.1, 0.1], [False, False])
    bits = ref.pack_mask(lay, [torch.rand(7, generator=g).to(device) < 0.5, torch.rand(600, generator=g).to(device) < 0.5])
    prefix = torch.ops.fsam_kernels.mask_block_prefix(bits)
    counts = [ref.mask_popcount(bits[:64]), ref.mask_popcount(bits[64:]), 5]
    # the originals of the three tensors back to back in one buffer (their dtype's)
    saved, slots, offsets = [torch.empty(sum(counts), device=device)], [0, 0, 0], [0, counts[0], counts[0] + counts[1]]
    norm = torch.tensor(2.5, device=device)
    nm = [torch.randn(8, 16, generator=g).to(device), torch.randn(4, 8, generator=g).to(device).half()]

    def rand(n):
        return torch.rand(n, generator=g).to(device)

    return {
        "fisher_accumulate": ([rand(7), rand(600)], [gr[0], gr[1].half()]),
        "select_mask": ([gr[0], gr[1].bfloat16()], [0, 512], 192, 100, True),
        "mask_block_prefix": (bits,),
        # no gradient for the second parameter, a strided one for the third
        "grad_norm": (w, [gr[0], None, torch.stack([gr[2], gr[2]], 1)[:, 0]], [False, True, False]),
        "masked_perturb": (w, gr, saved, slots, offsets, counts, bits, prefix, [0, 512, -1], [0.1, 0.2, 0.3],
                           [False, True, False], norm, 1e-12),
        "masked_restore": (w, saved, slots, offsets, counts, bits, prefix, [0, 512, -1], norm),
        "key_histogram": ([gr[0], gr[1].half(), torch.empty(0, device=device)], True, 0x3F, 16, 8),
        "mask_from_threshold": ([gr[0], gr[1]], [0, 512], 192, False, 0x3E000000, [0, 3]),
        "select_nm_mask": (nm, [], [0, 512], 192, 2, 4, True),
    }
