"""Models: the model families (families/), loading SD / SD2 / SDXL (loading), text and size conditioning, the trained
policy, tiny offline models."""
