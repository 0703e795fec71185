"""Optional CPU acceleration, behind one small interface. The core modules (model, losses, augment,
pretrain, transfer) hold no ctypes or raw-pointer code; they call:

- :mod:`.kernels`: tensor-level entry points of the C kernels (``normalize``, ``cut_and_augment``,
  ``uniform``, ``exp_row_sums_``, ``CosineTriplet``), each returning None (or declining) where its
  kernel does not apply or cannot be built, so the caller runs its PyTorch path;
- :mod:`.conv`: the greedy block's convolution as a matmul and conv + max-pool + ReLU fused;
- :mod:`.memory`: glibc's allocator told to keep freed memory, frames copied to huge pages;
- :mod:`.native`: building, caching and loading the C sources of ``csrc/``.

``CONTRASTIVE_LW_NATIVE=0`` switches every C kernel off; the PyTorch paths give the same values
(tests/test_native.py, tests/test_model.py)."""
