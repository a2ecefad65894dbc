"""Run configuration: the one nested settings model (:mod:`.settings`), its flat form
(:mod:`.flat`) and the seeds every side derives from it (:mod:`.seeds`)."""
