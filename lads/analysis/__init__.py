"""Seeing the subnets (paper Figs. 4-7): gate statistics, figures and an HTML report.

``lads.analysis.collect.analyze(model, expressions, expr_types, out_dir)`` runs all of it; the
pieces: ``collect`` (each expression's gates and α, from the text alone), ``stats`` (numbers from
hard gates and α), ``figures`` (PNGs), ``report`` (the HTML page).
"""
