"""Server configuration: typed dataclasses, presets, and loading (preset <- YAML file <- flags)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from advgrpo.common.errors import ConfigError
from advgrpo.common.typed_config import deep_merge, from_mapping, load_yaml, to_mapping

# "tiny" as a model id builds a small random-initialised model in memory (no downloads).
TINY = "tiny"
# "toy" as a DINOv2 backbone is the toy world's pretrained one, shipped in the package
# (advgrpo.reward_server.toy_backbone trained it; docs/EXPERIMENTS.md).
TOY = "toy"
TOY_DINOV2_DIR = Path(__file__).parent / "toy_dinov2"


@dataclass
class BatchingConfig:
    """Per-model dynamic batcher. ``enabled: false`` runs every request on its own."""

    enabled: bool = True
    max_batch_size: int = 32  # images per model call
    max_delay_ms: float = 5.0  # how long a partial batch waits for company
    max_queue_images: int = 4096  # beyond this, requests get RESOURCE_EXHAUSTED


@dataclass
class DinoParams:
    """Frozen DINOv2 backbone + trainable head (Adv-GRPO). Defaults are the paper's."""

    backbone: str = "facebook/dinov2-base"  # model id, local path, "toy" (shipped) or "tiny" (random)
    image_size: int = 518
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    head_hidden: int = 512
    num_patches: int = 64  # K patch tokens per image
    cls_weight: float = 0.7  # reward = cls_weight*cls + (1-cls_weight)*mean(patches)
    patch_loss_weight: float = 0.3
    # One transform for training and scoring: "l2" normalises each token, "none" keeps raw.
    feature_transform: Literal["l2", "none"] = "l2"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0  # head initialisation and the salt of the content-seeded patch sampling
    # Backbone tokens of reference images, kept by content so repeated references skip the
    # backbone (LRU, bounded by these bytes, held on the model's device; 0 disables it). One
    # ViT-B/14 image at 518 px is 1370x768 float32 = 4.2 MB, so 1 GiB holds ~250 references.
    feature_cache_bytes: int = 1 << 30
    # A second pool for images the model scored recently (generations): the trainer scores its
    # generations before it sends them to UpdateDiscriminator, so an update then runs no backbone
    # at all. Separate budget, so generations never evict references. 0 disables it.
    recent_feature_cache_bytes: int = 1 << 30


@dataclass
class DinoSimilarityParams:
    """Adv-GRPO's evaluation metric ("image_similarity"): an image's score is the cosine similarity
    of its DINOv2 CLS embedding (the final-layer-normed CLS token) to those of its group's reference
    images (``ImageGroup.references``), the maximum over them. Frozen; fp32."""

    backbone: str = "facebook/dinov2-base"  # model id, local path, "toy" (shipped) or "tiny" (random)
    image_size: int = 518
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    seed: int = 0  # initialisation of a "tiny" backbone
    # CLS embeddings of reference images, kept by content (the same references come with every
    # request for their prompt): 3 KiB per ViT-B/14 reference, so 64 MiB hold ~20k. 0 disables it.
    reference_cache_bytes: int = 64 << 20


@dataclass
class PickScoreParams:
    """CLIP scored as PickScore; optionally trained as a pairwise discriminator."""

    model: str = "yuvalkirstain/PickScore_v1"  # id, local path, or "tiny"
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # id, local path, or "tiny"
    trainable: bool = True
    trainable_blocks: int = 1  # last N vision transformer blocks train; the rest is frozen
    lr: float = 5e-6
    betas: tuple[float, float] = (0.5, 0.999)
    scale: float = 26.0  # reward = logit_scale.exp() * cos / scale
    seed: int = 0  # initialisation of "tiny" models


@dataclass
class OcrParams:
    """PP-OCR through rapidocr-onnxruntime (weights ship in the wheel)."""

    # Recognised spans below this confidence are dropped. 0.5 is PaddleOCR's drop_score, which
    # Flow-GRPO's OCR reward inherits.
    min_confidence: float = 0.5
    num_threads: int = 1  # onnxruntime intra-op threads per session; 0: all cores


@dataclass
class NoopParams:
    """Returns a constant: transport benchmarks and tests. ``delay_ms``: each call takes this long
    (a stand-in for a slow model in concurrency and load tests; 0 for benchmarks)."""

    value: float = 0.0
    delay_ms: float = 0.0


@dataclass
class BrightnessParams:
    """Mean pixel value in [0, 1]: a dense reward for tests and sanity checks of RL."""


@dataclass
class SaturationParams:
    """Mean HSV saturation in [0, 1]: a fixed scorer with a known bias, the toy world's stand-in for
    PickScore's taste for saturated colour (docs/EXPERIMENTS.md). A generator can raise it without
    drawing any better, which is what the hackable-reward experiment needs."""


KIND_PARAMS: dict[str, type] = {
    "dino": DinoParams,
    "dino_similarity": DinoSimilarityParams,
    "pickscore": PickScoreParams,
    "ocr": OcrParams,
    "noop": NoopParams,
    "brightness": BrightnessParams,
    "saturation": SaturationParams,
}


@dataclass
class ModelConfig:
    name: str
    kind: str
    params: Any  # one of KIND_PARAMS[kind]
    weight: float = 0.0  # weight in the default reward spec (0: not part of it)
    batching: BatchingConfig = field(default_factory=BatchingConfig)

    @property
    def trainable(self) -> bool:
        """Whether the model learns through UpdateDiscriminator (known before it is loaded)."""
        return self.kind == "dino" or (self.kind == "pickscore" and bool(self.params.trainable))


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (printed in the ready line)
    http_port: int | None = 8080  # None disables the HTTP side; 0 picks a free port
    state_dir: Path | None = None  # where discriminator state is made durable
    max_message_bytes: int = 64 * 1024 * 1024
    max_image_side: int = 4096
    max_aspect_ratio: float = 16.0  # an image's long side / short side (CLIP/OCR resizing blows up past it)
    # height*width*3 summed over one request's images (and PNG/JPEG bytes read from /dev/shm),
    # checked before anything is decoded: 1 GiB is ~1400 images of 512x512.
    max_request_decoded_bytes: int = 1 << 30
    # The same, summed over every request the server holds at once (decoding or being scored);
    # a request that would go over it gets RESOURCE_EXHAUSTED with a retry hint.
    max_inflight_decoded_bytes: int = 4 << 30
    max_images_per_request: int = 1024
    max_stream_inflight: int = 8  # ScoreStream requests scored concurrently per stream
    # RewardService RPCs in progress at once (an open stream counts); one more gets
    # RESOURCE_EXHAUSTED with a retry hint. Health and reflection are not counted.
    max_concurrent_rpcs: int = 256
    max_update_steps: int = 1000  # optimizer steps one UpdateDiscriminator may ask for
    # How long a Score waits for the versions its min_versions asks for (an update on its way)
    # before it fails with FAILED_PRECONDITION.
    min_version_wait_s: float = 30.0
    # Bearer tokens (advgrpo.reward_server.auth): auth_token is one token with the "update" scope
    # (--auth-token, $ADVGRPO_AUTH_TOKEN); tokens_file holds "TOKEN SCOPE" lines (--tokens-file);
    # tokens the same lines inline ($ADVGRPO_TOKENS). With none, every RPC is open.
    auth_token: str | None = None
    tokens_file: Path | None = None
    tokens: str | None = None
    # Listening on an address other than loopback with no tokens is refused unless this is set.
    insecure: bool = False
    # TLS for gRPC and HTTP: a PEM certificate chain and its key; with tls_client_ca, clients must
    # present a certificate signed by that CA (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    torch_threads: int = 0  # 0: torch's default
    keep_freed_memory: bool = True  # glibc keeps freed buffers warm (reward_server/allocator.py)
    shared_memory: bool = True  # read image bytes that local clients pass through /dev/shm
    drain_notice_s: float = 1.0  # NOT_SERVING is announced this long before new RPCs are refused
    drain_grace_s: float = 10.0  # then in-flight RPCs get this long to finish
    log_level: str = "INFO"


@dataclass
class RayDeploymentSettings:
    """One Ray Serve deployment of scoring replicas (``--backend ray``): the models each of its
    replicas hosts, and Serve's settings for it. Models in one deployment share its replicas'
    process and GPU share (``num_gpus`` may be a fraction, so that several replicas share a GPU)."""

    models: list[str] = field(default_factory=list)
    num_replicas: int | None = None  # None: ray.replicas (--replicas)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...); when
    # set, it replaces num_replicas.
    autoscaling: dict[str, Any] | None = None
    max_ongoing_requests: int = 16  # requests a replica takes at once (each is batched inside it)
    # Requests a caller's handle queues when every replica is full; beyond, RESOURCE_EXHAUSTED
    # with a retry hint. -1: no limit.
    max_queued_requests: int = 64


@dataclass
class RaySettings:
    """``--backend ray``: scoring replicas, the discriminator owner and the ingress as one Ray
    Serve application (advgrpo.reward_server.ray_serve)."""

    address: str | None = None  # a running cluster ("auto", "ray://..."); None: $RAY_ADDRESS, else a local one
    app_name: str = "advgrpo-reward"
    replicas: int = 1  # --replicas: scoring replicas of each deployment without its own num_replicas
    # Scoring deployments by name; empty: one deployment, "rewards", hosting every model.
    deployments: dict[str, RayDeploymentSettings] = field(default_factory=dict)
    owner_num_cpus: float = 1.0  # the discriminator owner: one replica, applies every update
    owner_num_gpus: float = 0.0
    # Custom Ray resources the owner needs: pins it to the node whose disk holds server.state_dir.
    owner_resources: dict[str, float] = field(default_factory=dict)
    ingress_num_cpus: float = 0.5  # our gRPC/HTTP front end: one replica, no model
    # Custom Ray resources the ingress needs: pins it to the node that declares them (the head
    # node, whose address clients use), e.g. {"advgrpo-ingress": 1}.
    ingress_resources: dict[str, float] = field(default_factory=dict)
    sync_poll_s: float = 5.0  # a replica's long-poll to the owner for new versions
    health_check_period_s: float = 2.0  # Serve's health checks of every replica
    health_check_timeout_s: float = 30.0


@dataclass
class ServerConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    models: list[ModelConfig] = field(default_factory=list)
    ray: RaySettings = field(default_factory=RaySettings)

    def scoring_deployments(self) -> dict[str, RayDeploymentSettings]:
        """ray.deployments, or the default: one deployment hosting every model."""
        if self.ray.deployments:
            return self.ray.deployments
        return {"rewards": RayDeploymentSettings(models=[m.name for m in self.models])}

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def default_weights(self) -> dict[str, float]:
        return {m.name: m.weight for m in self.models if m.weight}


# ---------------------------------------------------------------------------------------------
# Presets are plain mappings, so a YAML file merges over them key by key.


def _toy_dino(num_patches: int, lr: float) -> dict[str, Any]:
    """The DINO discriminator on the shipped toy DINOv2 (32 px, 64 patch tokens)."""
    params = {"backbone": TOY, "image_size": 32, "head_hidden": 64, "num_patches": num_patches, "lr": lr}
    caches = {"feature_cache_bytes": 64 << 20, "recent_feature_cache_bytes": 64 << 20}  # 16.6 KB/image: ~4k
    return {"kind": "dino", "weight": 1.0, "params": {**params, **caches}}


_TOY_DINO_SIMILARITY = {
    "kind": "dino_similarity",
    "params": {"backbone": TOY, "image_size": 32, "reference_cache_bytes": 16 << 20},
}

PRESETS: dict[str, dict[str, Any]] = {
    # Every kind of reward, small and with no downloads: the discriminator and the similarity
    # metric on the shipped toy DINOv2 (trained on the toy domain), PickScore on a tiny CLIP
    # built in memory (random weights: it scores, it is not a judge), real OCR.
    "tiny": {
        "server": {"port": 50051, "http_port": 8080},
        "models": {
            "dino": _toy_dino(num_patches=8, lr=3e-2),
            "pickscore": {
                "kind": "pickscore",
                "params": {"model": TINY, "processor": TINY, "lr": 1e-3},
            },
            "ocr": {"kind": "ocr", "batching": {"max_batch_size": 8}},
            # The evaluation metric (weight 0: asked for by name, with references in the groups).
            "dino_similarity": _TOY_DINO_SIMILARITY,
        },
    },
    # The toy world (docs/EXPERIMENTS.md): the discriminator and the similarity metric on the
    # shipped toy DINOv2 (32 px, 64 patch tokens), and the hackable proxy (saturation). No downloads.
    "toy": {
        "server": {"port": 50051, "http_port": 8080},
        "models": {
            # lr 100x the paper's 1e-4: an update here sees 64 images, not 1536, and the generator
            # takes an update every other epoch, not every tenth.
            "dino": _toy_dino(num_patches=16, lr=1e-2),
            "saturation": {"kind": "saturation"},
            "dino_similarity": _TOY_DINO_SIMILARITY,
        },
    },
    # The real models of Adv-GRPO on SD3.5-M.
    "sd3-adv": {
        "models": {
            "dino": {"kind": "dino", "weight": 1.0, "params": {}},
            "pickscore": {"kind": "pickscore", "params": {}},
            "ocr": {"kind": "ocr", "batching": {"max_batch_size": 8}},
            "dino_similarity": {"kind": "dino_similarity", "params": {}},
        },
    },
    # A no-op model only: measures transport.
    # Nothing to gain from batching a constant: no delay waiting for company.
    "noop": {"models": {"noop": {"kind": "noop", "weight": 1.0, "batching": {"max_delay_ms": 0}}}},
}


def build_config(data: Mapping[str, Any]) -> ServerConfig:
    """Validates a merged mapping ({server: ..., models: {name: {kind, params, ...}}})."""
    unknown = sorted(set(data) - {"server", "models", "ray"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known keys: models, ray, server)")
    server = from_mapping(ServerSettings, data.get("server"), "server")
    ray = from_mapping(RaySettings, data.get("ray"), "ray")
    models_data = data.get("models") or {}
    if not isinstance(models_data, Mapping):
        raise ConfigError("models: expected a mapping of model name -> model config")
    models = []
    for name, spec in models_data.items():
        path = f"models.{name}"
        if spec is None:  # `name: null` in a YAML file removes a preset's model
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(spec).__name__}")
        kind = spec.get("kind")
        if kind not in KIND_PARAMS:
            raise ConfigError(f"{path}.kind: expected one of {', '.join(KIND_PARAMS)}, got {kind!r}")
        extra = sorted(set(spec) - {"kind", "params", "weight", "batching"})
        if extra:
            raise ConfigError(f"{path}.{extra[0]}: unknown key (known keys: batching, kind, params, weight)")
        params = from_mapping(KIND_PARAMS[kind], spec.get("params"), f"{path}.params")
        rest = {k: v for k, v in spec.items() if k in ("weight", "batching")}
        base = from_mapping(_ModelFields, rest, path)
        models.append(ModelConfig(name=str(name), kind=kind, params=params, weight=base.weight, batching=base.batching))
    if not models:
        raise ConfigError("models: no models configured")
    _validate(server, models)
    _validate_ray(ray, models)
    return ServerConfig(server=server, models=models, ray=ray)


@dataclass
class _ModelFields:
    weight: float = 0.0
    batching: BatchingConfig = field(default_factory=BatchingConfig)


# What a model's name must look like: it names its state file (<state-dir>/<name>.safetensors).
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_GRPC_MESSAGE_BYTES = (1 << 31) - 1  # gRPC keeps message lengths in an int32


def address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a literal address or "localhost") only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _validate_security(server: ServerSettings) -> None:
    from advgrpo.reward_server.auth import TOKEN_ENV, TOKENS_ENV, build_table

    tokens = build_table(server.tokens_file, server.tokens, server.auth_token)  # reads and checks the file
    if not tokens and not server.insecure and not is_loopback(server.host):
        raise ConfigError(
            f"server.host {server.host}: listening on an address other than loopback with no tokens would let "
            "anyone who reaches it score and train the discriminator; configure tokens (--tokens-file, "
            f"${TOKENS_ENV} or --auth-token/${TOKEN_ENV}), or pass --insecure (server.insecure) to allow it"
        )
    if (server.tls_cert is None) != (server.tls_key is None):
        raise ConfigError("server.tls_cert, server.tls_key: give both (--tls-cert and --tls-key) or neither")
    if server.tls_client_ca is not None and server.tls_cert is None:
        raise ConfigError("server.tls_client_ca: mutual TLS needs the server's own --tls-cert and --tls-key")
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(server, key)
        if path is not None:
            read_pem(path, f"--{key.replace('_', '-')}")


def read_pem(path: Path, flag: str) -> bytes:
    """A PEM file's bytes; an unreadable or non-PEM file is a ConfigError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def _validate(server: ServerSettings, models: list[ModelConfig]) -> None:
    # "[::1]" (as in a URL) and "::1" both mean the IPv6 literal; keep it bare.
    if server.host.startswith("[") and server.host.endswith("]"):
        server.host = server.host[1:-1]
    if not server.host:
        raise ConfigError("server.host: must not be empty")
    _validate_security(server)
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"server.port: must be in 0..65535, got {server.port}")
    if server.http_port is not None and not 0 <= server.http_port <= 65535:
        raise ConfigError(f"server.http_port: must be in 0..65535, got {server.http_port}")
    if not 1024 <= server.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES:
        raise ConfigError(
            f"server.max_message_bytes: must be in 1024..{MAX_GRPC_MESSAGE_BYTES} (gRPC's limit), "
            f"got {server.max_message_bytes}"
        )
    if server.max_request_decoded_bytes < 1:
        raise ConfigError(f"server.max_request_decoded_bytes: must be >= 1, got {server.max_request_decoded_bytes}")
    if server.max_inflight_decoded_bytes < server.max_request_decoded_bytes:
        raise ConfigError(
            f"server.max_inflight_decoded_bytes: must be >= server.max_request_decoded_bytes "
            f"({server.max_request_decoded_bytes}), got {server.max_inflight_decoded_bytes}"
        )
    if server.max_concurrent_rpcs < 1:
        raise ConfigError(f"server.max_concurrent_rpcs: must be >= 1, got {server.max_concurrent_rpcs}")
    if not 0 <= server.min_version_wait_s < float("inf"):  # also refuses NaN
        raise ConfigError(f"server.min_version_wait_s: must be >= 0 and finite, got {server.min_version_wait_s}")
    if not server.max_aspect_ratio >= 1:  # also refuses NaN
        raise ConfigError(f"server.max_aspect_ratio: must be >= 1, got {server.max_aspect_ratio}")
    if server.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"server.log_level: expected one of {', '.join(LOG_LEVELS)}, got {server.log_level!r}")
    for m in models:
        if not MODEL_NAME.match(m.name):
            raise ConfigError(
                f"models.{m.name}: a model name may use only letters, digits, '_', '.' and '-' "
                "(it names the model's state file)"
            )
        b = m.batching
        if b.max_batch_size < 1:
            raise ConfigError(f"models.{m.name}.batching.max_batch_size: must be >= 1")
        if b.max_delay_ms < 0:
            raise ConfigError(f"models.{m.name}.batching.max_delay_ms: must be >= 0")
        if b.max_queue_images < b.max_batch_size:
            raise ConfigError(f"models.{m.name}.batching.max_queue_images: must be >= max_batch_size")
        if m.kind == "dino":
            p = m.params
            if p.num_patches < 1:
                raise ConfigError(f"models.{m.name}.params.num_patches: must be >= 1")
            if not 0.0 <= p.cls_weight <= 1.0:
                raise ConfigError(f"models.{m.name}.params.cls_weight: must be in [0, 1]")
            for key in ("feature_cache_bytes", "recent_feature_cache_bytes"):
                if getattr(p, key) < 0:
                    raise ConfigError(f"models.{m.name}.params.{key}: must be >= 0 (0 disables the cache)")
        if m.kind == "dino_similarity":
            p = m.params
            if p.image_size < 1:
                raise ConfigError(f"models.{m.name}.params.image_size: must be >= 1")
            if p.reference_cache_bytes < 0:
                raise ConfigError(f"models.{m.name}.params.reference_cache_bytes: must be >= 0 (0 disables the cache)")
        if m.kind == "noop" and not 0.0 <= m.params.delay_ms <= 60_000:
            raise ConfigError(f"models.{m.name}.params.delay_ms: must be in [0, 60000]")


def _validate_ray(ray: RaySettings, models: list[ModelConfig]) -> None:
    if ray.replicas < 1:
        raise ConfigError(f"ray.replicas: must be >= 1, got {ray.replicas}")
    if not ray.app_name:
        raise ConfigError("ray.app_name: must not be empty")
    for key in ("sync_poll_s", "health_check_period_s", "health_check_timeout_s"):
        if not getattr(ray, key) > 0:
            raise ConfigError(f"ray.{key}: must be > 0, got {getattr(ray, key)}")
    for key in ("owner_num_cpus", "owner_num_gpus", "ingress_num_cpus"):
        if not getattr(ray, key) >= 0:
            raise ConfigError(f"ray.{key}: must be >= 0, got {getattr(ray, key)}")
    names = [m.name for m in models]
    hosted: dict[str, str] = {}
    for dep_name, dep in ray.deployments.items():
        where = f"ray.deployments.{dep_name}"
        if not MODEL_NAME.match(dep_name):
            raise ConfigError(f"{where}: a deployment name may use only letters, digits, '_', '.' and '-'")
        if not dep.models:
            raise ConfigError(f"{where}.models: names no model")
        for name in dep.models:
            if name not in names:
                raise ConfigError(f"{where}.models: {name!r} is not a configured model (models: {', '.join(names)})")
            if name in hosted:
                raise ConfigError(f"{where}.models: {name!r} is already hosted by ray.deployments.{hosted[name]}")
            hosted[name] = dep_name
        if dep.num_replicas is not None and dep.num_replicas < 1:
            raise ConfigError(f"{where}.num_replicas: must be >= 1, got {dep.num_replicas}")
        if not (dep.num_cpus >= 0 and dep.num_gpus >= 0):
            raise ConfigError(f"{where}: num_cpus and num_gpus must be >= 0")
        if dep.max_ongoing_requests < 1:
            raise ConfigError(f"{where}.max_ongoing_requests: must be >= 1, got {dep.max_ongoing_requests}")
        if dep.max_queued_requests < -1 or dep.max_queued_requests == 0:
            raise ConfigError(f"{where}.max_queued_requests: must be >= 1, or -1 for no limit")
    if ray.deployments:
        missing = [n for n in names if n not in hosted]
        if missing:
            raise ConfigError(f"ray.deployments: no deployment hosts model {missing[0]!r}; every model needs one")


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Preset, then the YAML file over it, then ``overrides`` ({"server": {...}}) from flags."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        data = deep_merge(data, PRESETS[preset])
    if config_file is not None:
        data = deep_merge(data, load_yaml(config_file))
    if overrides:
        data = deep_merge(data, overrides)
    return build_config(data)


def dump_config(config: ServerConfig) -> dict[str, Any]:
    """The mapping form of a config (what ``--print-config`` shows)."""
    out = config_mapping(config)
    for secret in ("auth_token", "tokens"):  # never printed, logged or written back
        if out["server"].get(secret):
            out["server"][secret] = "<redacted>"
    return out


def config_mapping(config: ServerConfig) -> dict[str, Any]:
    """The mapping form of a config, secrets included: ``build_config`` of it gives the same config
    (how the Ray backend hands its config to the processes it starts)."""
    out = {"server": to_mapping(config.server), "models": {}, "ray": to_mapping(config.ray)}
    for m in config.models:
        out["models"][m.name] = {
            "kind": m.kind,
            "weight": m.weight,
            "batching": to_mapping(m.batching),
            "params": to_mapping(m.params),
        }
    return out
