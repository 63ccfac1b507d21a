"""The benchmark harness of issue 6: a scripted model, a bare pass-through (the floor), a load
generator and the runner behind `laneway bench`. Each server and the load generator run in a
process of their own, so none of them shares a GIL with another or is charged another's CPU.
"""
