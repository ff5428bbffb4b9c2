"""The server survives its actor's death: after every round the driver holds a reference to the
server's state (owned by the driver, so it outlives the actor's process), and a round in which
the server died is run again on a server rebuilt from that state. The lost attempt's aggregate
died with the server, so nothing is merged twice; its clients trained and are sampled again (their
local state and, under local DP, their privacy spending go on from where the attempt left them).
Only the Ray runtime has actors that die."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from raysim.config import UserError

if TYPE_CHECKING:
    from raysim.runtime.simulation import Simulation

log = logging.getLogger("raysim")

PING_TIMEOUT_S = 30.0


def failures(sim: Simulation) -> tuple[type[BaseException], ...]:
    """What a call raises when the server is gone: its own death, or (in a worker's call) the loss
    of an object it owned, such as the broadcast adapter."""
    if sim.backend.name != "ray":
        return ()
    from ray.exceptions import ObjectLostError, RayActorError

    return (RayActorError, ObjectLostError)


def snapshot(sim: Simulation) -> None:
    """Keep a reference to the server's state as it is now (between rounds)."""
    if sim.backend.name == "ray":
        sim.server_snapshot = sim.server.state_dict.remote()


def server_is_gone(sim: Simulation) -> bool:
    try:
        sim.backend.get(sim.server.ping.remote(), timeout=PING_TIMEOUT_S)
        return False
    except (*sim.backend.lost, *sim.backend.timed_out):
        return True


def rebuild(sim: Simulation, round_idx: int) -> None:
    """A new server actor with the state of the last completed round."""
    log.warning("round %d: the server actor died; rebuilding it from round %d's state and running round %d again", round_idx, round_idx - 1, round_idx)
    sim.backend.kill(sim.server)
    sim.server = sim.backend.actor(sim.server_class, *sim.server_args, num_cpus=0)
    try:
        sim.backend.get(sim.server.load_state_dict.remote(sim.server_snapshot))
    except failures(sim) as err:
        raise UserError(f"server: could not be rebuilt after it died in round {round_idx} ({type(err).__name__}); resume=OUTPUT_DIR continues from the last checkpoint") from None
