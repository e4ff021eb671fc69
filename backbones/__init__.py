"""The Stage III backbones behind one interface (base.py: `Backbone`): SASRec (the Taesar decoder's
architecture), GRU4Rec, CL4SRec, GCE-GNN, and any RecBole sequential model through its adapter;
registry.py builds one by name and checks its keys."""
