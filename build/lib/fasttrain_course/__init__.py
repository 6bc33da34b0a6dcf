"""The course tooling: runs chapters with papermill, releases assignments with nbgrader, builds the book.

It imports the teaching library (`fasttrain`), never the other way round, and needs the
`course` extra (`pip install -e ".[course]"`): papermill, nbformat, nbgrader, Jupyter Book, PyYAML.
Every function takes the course folder as an argument or finds it from the working directory.
"""
