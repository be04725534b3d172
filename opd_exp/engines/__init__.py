"""The engines layer: implementations of the core Protocols on real engines — HF models
(hf_models, hf_policy), rollouts (rollout_hf, rollout_vllm, rollout_vllm_server), teachers
(teacher_hf, teacher_vllm), learners (learner_torch, learner_deepspeed). vllm and deepspeed are
imported only inside the modules that wrap them; each module's `make` is named in
opd_exp/config/registry.py."""
