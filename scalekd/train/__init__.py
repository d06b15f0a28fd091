"""Training stages (teacher, warm-up, distill): one worker loop, run alone or by Ray Train."""
