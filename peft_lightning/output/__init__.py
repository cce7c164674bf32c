"""What a run leaves and shows: its folder and loggers, the records of its phases, the printed summary, the curves,
and the model card."""
