"""The committed xmodal-mini image and audio towers (ONNX) and recipe.json; a package so that they install."""
