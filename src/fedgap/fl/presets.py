"""Algorithm presets: names for common compositions of (client objective, server optimizer, norm policy).

An algorithm in fedgap is not a branch in the loop but three independent choices (the FedOpt view of
Reddi et al. 2021): what a client minimizes locally (``client.objective``), how the server turns the mean
client delta into a new model (``server.optimizer``), and what is shared (``model.norm_policy``). A preset
only fills the choices the user left open, so ``server.algorithm=fedprox server.optimizer=adam`` is a
FedProx client under a FedAdam server. FedNova's normalized averaging has no key of its own: it comes with
``server.algorithm=fednova``, which leaves the three choices open (``server.algorithm=fednova
client.objective=prox`` is FedNova with FedProx clients). Adding a preset is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    objective: str = "local"  # local | prox | scaffold            (fedgap.fl.objectives)
    server_optimizer: str = "sgd"  # sgd | momentum | adam | yogi | adagrad   (fedgap.fl.server)
    norm_policy: str = "average"  # average | local | recalibrate       (fedgap.fl.normpolicy)
    normalized: bool = False  # FedNova's normalized averaging of the client updates (fedgap.fl.fednova)
    citation: str = ""


PRESETS: dict[str, Preset] = {
    "fedavg": Preset(citation="McMahan et al. 2017, Communication-Efficient Learning of Deep Networks"),
    "fedprox": Preset(objective="prox", citation="Li et al. 2020, Federated Optimization in Heterogeneous Networks"),
    "scaffold": Preset(objective="scaffold", citation="Karimireddy et al. 2020, SCAFFOLD"),
    "fedbn": Preset(norm_policy="local", citation="Li et al. 2021, FedBN: Federated Learning on Non-IID Features"),
    "fedavgm": Preset(server_optimizer="momentum", citation="Hsu et al. 2019, Measuring the Effects of Non-IID Data"),
    "fedadam": Preset(server_optimizer="adam", citation="Reddi et al. 2021, Adaptive Federated Optimization"),
    "fedyogi": Preset(server_optimizer="yogi", citation="Reddi et al. 2021, Adaptive Federated Optimization"),
    "fedadagrad": Preset(server_optimizer="adagrad", citation="Reddi et al. 2021, Adaptive Federated Optimization"),
    "fednova": Preset(normalized=True, citation="Wang et al. 2020, Tackling the Objective Inconsistency Problem"),
}
