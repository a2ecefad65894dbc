"""What a run leaves: its run folder (:mod:`.folder`), its summary (:mod:`.summary`) and the few
lines of answer a person reads (:mod:`.answer`)."""
