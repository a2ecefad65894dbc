"""The wire format: every message of the federated protocol, encoded and decoded in one place.

The ServerApp and the ClientApp build and read message contents only through
this package; no record key is spelled anywhere else (a test checks).

========================  ==========================================  ==================================
message type              server -> client                            client -> server
========================  ==========================================  ==================================
``train``                 Flower FedAvg: weights, the job, checkpoint  updated weights, example count
``query.featurize``       the job, every checkpoint's weights          one Gram upper triangle per
                                                                      checkpoint and the client's info
  clip-norm round         the same, asking for the norm histogram      the noised norm histogram, info
  secure aggregation      the same, with the protocol's context        signed keys, info
``query.features``        as ``query.featurize`` (trusted server)     features and out-to-loss weights
``query.score``           the job, preconditioned queries ``U_m``,    what the release policy allows
                          the policy (kernel inverses for             (owner totals or noised owner
                          self-influence)                             summaries, scores, ...), info
``query.secagg_*``        :mod:`fedtrak.wire.secagg`
========================  ==========================================  ==================================

Decoders raise :class:`FedtrakError` naming the message's source and what is
missing or malformed; the server's checks of what a release may contain are
in :mod:`fedtrak.server.validation`.
"""

from __future__ import annotations

from fedtrak.wire import attribution, records, secagg
from fedtrak.wire.attribution import (
    FEDAVG_KEYS,
    ClientInfo,
    FeaturizeRequest,
    ScoreRelease,
    ScoreRequest,
    add_info,
    claimed_owner,
    decode_features,
    decode_featurize_request,
    decode_grams,
    decode_histogram,
    decode_info,
    decode_score_reply,
    decode_score_request,
    decode_train_request,
    encode_features_reply,
    encode_featurize_request,
    encode_grams_reply,
    encode_histogram_reply,
    encode_score_reply,
    encode_score_request,
    encode_train_reply,
    train_config,
)
from fedtrak.wire.records import (
    FEATURES,
    FEATURIZE,
    SCORE,
    SECAGG_INPUT,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    TRAIN,
    add_handler_timing,
    add_timing,
    decode_job,
    drop_timing,
    encode_job,
    error_owner,
    error_reason,
    job_of,
    payload_bytes,
    read_handler_timing,
    read_timing,
    record_to_state,
    state_to_record,
    with_frozen,
)

#: Every message type and record key of the wire format: no other module spells one (a test checks).
KEYS = (FEATURES, FEATURIZE, SCORE, SECAGG_INPUT, SECAGG_SHARE, SECAGG_UNMASK, records.JOB, records.TIMING,
        *attribution.RECORD_KEYS, *secagg.RECORD_KEYS)

__all__ = [
    "FEATURES",
    "FEATURIZE",
    "FEDAVG_KEYS",
    "SCORE",
    "SECAGG_INPUT",
    "SECAGG_SHARE",
    "SECAGG_UNMASK",
    "TRAIN",
    "ClientInfo",
    "FeaturizeRequest",
    "ScoreRelease",
    "ScoreRequest",
    "add_handler_timing",
    "add_info",
    "add_timing",
    "claimed_owner",
    "decode_features",
    "decode_featurize_request",
    "decode_grams",
    "decode_histogram",
    "decode_info",
    "decode_job",
    "decode_score_reply",
    "decode_score_request",
    "decode_train_request",
    "drop_timing",
    "encode_features_reply",
    "encode_featurize_request",
    "encode_grams_reply",
    "encode_histogram_reply",
    "encode_job",
    "encode_score_reply",
    "encode_score_request",
    "encode_train_reply",
    "error_owner",
    "error_reason",
    "job_of",
    "payload_bytes",
    "read_handler_timing",
    "read_timing",
    "record_to_state",
    "state_to_record",
    "train_config",
    "with_frozen",
]
