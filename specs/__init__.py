"""Built-in structures, each written in the structdsl DSL and nothing else (beside
``spanning_tree``, its plain reference solver ``mst_by_sorting``, which does not use the DSL).

=================  ==========================================  ==============================
spec               algorithm                                   structure fields
=================  ==========================================  ==============================
categorical        one race over all atoms                     index
top_k (k)          k races, winner retired                     order [k], subset [n]
permutation        race until empty (Plackett-Luce)            order [n], rank [n]
spanning_tree      Kruskal                                     adjacency [n, n]
arborescence       Chu-Liu/Edmonds, grouped races (root)       parent [n]
binary_tree        Cartesian tree, one group per open span     parent, left, right [n]
matching           race live cells, retire row and column      match [d]
clustering (c)     Kruskal stopped at c components             links [n, n], label [n]
=================  ==========================================  ==============================
"""
from .arborescence import arborescence
from .binary_tree import binary_tree
from .categorical import categorical
from .clustering import clustering
from .matching import matching
from .permutation import permutation
from .spanning_tree import spanning_tree
from .top_k import top_k

__all__ = ["categorical", "top_k", "permutation", "spanning_tree", "arborescence",
           "binary_tree", "matching", "clustering"]
