"""3D face models shared by the pipeline and evaluation: the dense BFM (:mod:`.bfm`), the
300W-LP / AFLW2000-3D ``.mat`` fits (:mod:`.mat_fit`) and the Surrey Face Model of the
synthetic generator (:mod:`.sfm`)."""
