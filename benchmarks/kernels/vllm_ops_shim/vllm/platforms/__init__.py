"""`current_platform`: the CUDA device torch sees, or the CPU."""

import torch


class _Platform:
    def is_cuda(self) -> bool:
        return torch.cuda.is_available()

    def has_device_capability(self, capability: int) -> bool:
        if not self.is_cuda():
            return False
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor >= capability

    @property
    def dispatch_key(self) -> str:
        return "CUDA" if self.is_cuda() else "CPU"


current_platform = _Platform()
