"""Serving side: the RunPod worker. Never imports DVC or anything under stages/."""
