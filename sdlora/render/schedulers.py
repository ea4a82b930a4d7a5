"""Samplers by the names people use, mapped to diffusers schedulers.

Each name builds its scheduler with `from_config(pipeline.scheduler.config)`, so the base's
noise schedule and prediction type carry over; only the sampling algorithm changes. The
AUTOMATIC1111 sampler and schedule-type labels go into the PNG `parameters` text so that other
tools read the settings back.

LMS (needs scipy) and DPM++ SDE (needs torchsde) are left out: sdlora does not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdlora.errors import SdloraError


@dataclass(frozen=True)
class Sampler:
    scheduler_class: str  # a diffusers scheduler class name
    a1111_name: str  # "Sampler:" in the PNG parameters
    karras: bool = False  # Karras sigmas ("Schedule type: Karras")
    options: dict = field(default_factory=dict)


def _karras_pair(name: str, scheduler_class: str, a1111_name: str, **options) -> dict[str, Sampler]:
    return {
        name: Sampler(scheduler_class, a1111_name, False, {**options, "use_karras_sigmas": False}),
        f"{name}_karras": Sampler(
            scheduler_class, a1111_name, True, {**options, "use_karras_sigmas": True}
        ),
    }


SAMPLERS: dict[str, Sampler] = {
    **_karras_pair("euler", "EulerDiscreteScheduler", "Euler"),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", "Euler a"),
    **_karras_pair("heun", "HeunDiscreteScheduler", "Heun"),
    **_karras_pair("dpm2", "KDPM2DiscreteScheduler", "DPM2"),
    **_karras_pair("dpm2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    **_karras_pair(
        "dpm++_2m",
        "DPMSolverMultistepScheduler",
        "DPM++ 2M",
        algorithm_type="dpmsolver++",
        solver_order=2,
    ),
    **_karras_pair(
        "dpm++_2m_sde",
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE",
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
    ),
    "ddim": Sampler("DDIMScheduler", "DDIM"),
    "pndm": Sampler("PNDMScheduler", "PLMS", options={"skip_prk_steps": True}),
    "unipc": Sampler("UniPCMultistepScheduler", "UniPC"),
    "deis": Sampler("DEISMultistepScheduler", "DEIS"),
}


def get_sampler(name: str) -> Sampler:
    """The sampler called `name` (case-insensitive; "Euler a" and "euler-a" also work)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in SAMPLERS:
        raise SdloraError(f"unknown scheduler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[key]


def build_scheduler(name: str, base_config):
    """A fresh scheduler for `name` that keeps the base scheduler's noise schedule."""
    import diffusers

    sampler = get_sampler(name)
    scheduler_class = getattr(diffusers, sampler.scheduler_class)
    return scheduler_class.from_config(base_config, **sampler.options)
