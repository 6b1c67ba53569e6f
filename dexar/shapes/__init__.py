"""The bundled Shapes model: architecture, vocabulary and checkpoint location."""
